// A real browser follows the stream: headless Chromium opens a page that reads STREAM_URL
// over an EventSource and over a `vulcan-stream.v1` WebSocket that reconnects with `since`,
// and reports what each received.
//
// Driven by tests/integration/browser.rs. Environment:
//   STREAM_URL  http://127.0.0.1:PORT/stream (the page's origin is another port: cross-origin)
//   COUNT       how many messages ({"seq":N}) each transport must receive
//   CHROMIUM    the browser binary (default /usr/bin/chromium)
// Prints one JSON line `{"ready":true}` once both transports are connected, then one line with
// what each received: {"sse":{...},"ws":{...}}. Exits 1 with a message on any failure, and
// gives up after DEADLINE_MS.

import http from 'node:http';
import { chromium } from 'playwright-core';

const DEADLINE_MS = 60_000;
const streamUrl = process.env.STREAM_URL;
const count = Number(process.env.COUNT);
if (!streamUrl || !(count > 0)) {
  console.error('follow.mjs: set STREAM_URL and COUNT');
  process.exit(2);
}

// Runs in the page. Each transport records the `seq` of every message, every id, resets and
// how often it (re)connected.
const pageScript = `
window.results = {
  sse: { seqs: [], ids: [], resets: [], opens: 0, errors: 0 },
  ws: { seqs: [], ids: [], resets: [], opens: 0, closes: 0 },
};
const streamUrl = ${JSON.stringify(streamUrl)};

const sse = new EventSource(streamUrl);
sse.onopen = () => { results.sse.opens += 1; };
sse.onerror = () => { results.sse.errors += 1; };
sse.onmessage = (e) => {
  results.sse.ids.push(e.lastEventId);
  results.sse.seqs.push(JSON.parse(e.data).seq);
};
sse.addEventListener('reset', (e) => { results.sse.resets.push(e.data); });

let last = null;
function connect() {
  const url = streamUrl.replace(/^http/, 'ws') + (last ? '?since=' + encodeURIComponent(last) : '');
  const ws = new WebSocket(url, ['vulcan-stream.v1']);
  ws.onopen = () => { results.ws.opens += 1; };
  ws.onmessage = (e) => {
    const frame = JSON.parse(e.data);
    if ('data' in frame) {
      last = frame.id;
      results.ws.ids.push(frame.id);
      results.ws.seqs.push(frame.data.seq);
    } else if (frame.event === 'reset') {
      last = frame.id;
      results.ws.resets.push(frame);
    }
  };
  ws.onclose = () => { results.ws.closes += 1; setTimeout(connect, 100); };
}
connect();
`;

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  res.end(`<!doctype html><title>follow</title><script>${pageScript}</script>`);
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const pageUrl = `http://127.0.0.1:${server.address().port}/`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
let status = 0;
try {
  const page = await browser.newPage();
  page.on('pageerror', (err) => console.error('page error:', err.message));
  await page.goto(pageUrl);
  const deadline = Date.now() + DEADLINE_MS;
  await page.waitForFunction(() => results.sse.opens > 0 && results.ws.opens > 0, null, {
    timeout: DEADLINE_MS,
  });
  console.log(JSON.stringify({ ready: true }));
  await page.waitForFunction(
    (n) => results.sse.seqs.length >= n && results.ws.seqs.length >= n,
    count,
    { timeout: Math.max(1, deadline - Date.now()), polling: 50 },
  ).catch(() => {});
  console.log(JSON.stringify(await page.evaluate(() => results)));
} catch (err) {
  console.error('follow.mjs:', err.message);
  status = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(status);
