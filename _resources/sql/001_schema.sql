-- vulcan-stream durable (table) mode: schema version 1.
--
-- `vulcan-stream migrate` runs this file (embedded in the binary) in one transaction. Teams that
-- run their own migrations can apply it as it is, in one transaction (`psql -1 -f`): every
-- statement is idempotent, and the first one serialises concurrent runs.
--
-- Publishers only INSERT (directly, or through vulcan_stream.publish): a row gets an insert-order
-- `id` and no position. One server at a time, the sequencer, gives committed rows their
-- positions (`pos`) in short transactions that follow each other, through
-- vulcan_stream.assign_positions; so positions become visible in order and a reader that reads
-- `pos > last ORDER BY pos` never skips a row, whatever order the publishers committed in.

-- Concurrent runs (several replicas starting at once) wait here, then find everything done.
SELECT pg_advisory_xact_lock(30323, 1);

CREATE SCHEMA IF NOT EXISTS vulcan_stream;

CREATE TABLE IF NOT EXISTS vulcan_stream.schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row: the stream's lineage (the epoch of every position, the same on every replica and
-- across restarts, new only if the schema is created again) and the last position given.
CREATE TABLE IF NOT EXISTS vulcan_stream.lineage (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       text    NOT NULL DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 16)
                        CHECK (epoch ~ '^[0-9a-f]{1,16}$'),
    head        bigint  NOT NULL DEFAULT 0
);
INSERT INTO vulcan_stream.lineage DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The largest payload publishers may store, in bytes: a constant that `vulcan-stream migrate`
-- sets from MaxPayload (a function rather than a row, so that the check costs no lookup).
-- Replace it to change the limit; applying this file again keeps the value it finds.
DO $$
BEGIN
    IF to_regprocedure('vulcan_stream.max_payload()') IS NULL THEN
        CREATE FUNCTION vulcan_stream.max_payload() RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 1048576';
    END IF;
END
$$;

-- The messages. `pos` is NULL until the sequencer gives the committed row its position.
CREATE TABLE IF NOT EXISTS vulcan_stream.messages (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pos        bigint,
    channel    text        NOT NULL,
    payload    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Readers: `channel = $1 AND pos > $2 ORDER BY pos`. The position indexes hold only
-- positioned rows, so that a publisher's insert touches none of them: the sequencer's update
-- adds the entries, in its own batched transaction.
CREATE INDEX IF NOT EXISTS messages_channel_pos ON vulcan_stream.messages (channel, pos)
    WHERE pos IS NOT NULL;
-- A position is given once; retention deletes in this order.
CREATE UNIQUE INDEX IF NOT EXISTS messages_pos ON vulcan_stream.messages (pos)
    WHERE pos IS NOT NULL;
-- The sequencer: the rows still without a position, in insert order.
CREATE INDEX IF NOT EXISTS messages_unsequenced ON vulcan_stream.messages (id) WHERE pos IS NULL;

-- The payload rules of the stream, the same as the server's: a JSON object whose fields
-- `action`, `check_id`, `agent_id` and `scan_id` (names matched as Go's encoding/json matches
-- them: ASCII case, and the Kelvin sign and long s), where present, are strings or null; at most
-- vulcan_stream.max_payload() bytes. A row that breaks them fails the publisher's statement.
CREATE OR REPLACE FUNCTION vulcan_stream.check_message() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    doc   json;
    field record;
    why   text;
BEGIN
    IF NEW.channel = '' OR octet_length(NEW.channel) > 63 THEN
        RAISE EXCEPTION 'vulcan_stream: channel % is not a channel name (1 to 63 bytes)', quote_literal(NEW.channel)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(NEW.payload) > vulcan_stream.max_payload() THEN
        RAISE EXCEPTION 'vulcan_stream: payload of % bytes on channel % exceeds the limit of % bytes (MaxPayload)',
            octet_length(NEW.payload), quote_literal(NEW.channel), vulcan_stream.max_payload()
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF btrim(NEW.payload, E' \t\n\r') = '' THEN
        RAISE EXCEPTION 'vulcan_stream: empty payload on channel %', quote_literal(NEW.channel)
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    BEGIN
        doc := NEW.payload::json;
    EXCEPTION WHEN invalid_text_representation OR untranslatable_character THEN
        GET STACKED DIAGNOSTICS why = PG_EXCEPTION_DETAIL;
        RAISE EXCEPTION 'vulcan_stream: payload on channel % is not JSON: %', quote_literal(NEW.channel),
            coalesce(nullif(why, ''), SQLERRM)
            USING ERRCODE = 'invalid_text_representation';
    END;
    IF json_typeof(doc) <> 'object' THEN
        RAISE EXCEPTION 'vulcan_stream: payload on channel % is a JSON %, not an object', quote_literal(NEW.channel), json_typeof(doc)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR field IN SELECT key, value FROM json_each(doc) LOOP
        IF translate(field.key, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' || U&'\212A\017F', 'abcdefghijklmnopqrstuvwxyzks')
               IN ('action', 'check_id', 'agent_id', 'scan_id')
           AND json_typeof(field.value) NOT IN ('string', 'null') THEN
            RAISE EXCEPTION 'vulcan_stream: payload field % on channel % is a JSON %, agents need a string or null',
                quote_literal(field.key), quote_literal(NEW.channel), json_typeof(field.value)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- Positions are the sequencer's to give.
    NEW.pos := NULL;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS check_message ON vulcan_stream.messages;
CREATE TRIGGER check_message BEFORE INSERT ON vulcan_stream.messages
    FOR EACH ROW EXECUTE FUNCTION vulcan_stream.check_message();

-- Publishing: the message exists if and only if the caller's transaction commits. Returns the
-- row's id (not its position: that is given after the commit). PL/pgSQL rather than SQL: it
-- keeps the INSERT's plan for the session, where an SQL function plans it at every call.
CREATE OR REPLACE FUNCTION vulcan_stream.publish(channel text, payload text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO vulcan_stream.messages (channel, payload) VALUES ($1, $2) RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

-- The sequencer's step: gives the committed rows without a position (at most max_rows, in
-- insert order) the next positions, moves the head, and wakes the readers with one NOTIFY
-- whose payload is the new head. The lineage row's lock serialises steps, so each commits
-- before the next one takes its positions. Returns the head.
CREATE OR REPLACE FUNCTION vulcan_stream.assign_positions(max_rows integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    start bigint;
    assigned bigint;
BEGIN
    -- Idle steps (most of them) stay read-only: no lock, no transaction id.
    IF NOT EXISTS (SELECT 1 FROM vulcan_stream.messages WHERE pos IS NULL) THEN
        SELECT head INTO start FROM vulcan_stream.lineage;
        RETURN start;
    END IF;
    SELECT head INTO start FROM vulcan_stream.lineage FOR UPDATE;
    WITH batch AS (
        SELECT id, row_number() OVER (ORDER BY id) AS n
        FROM vulcan_stream.messages
        WHERE pos IS NULL
        ORDER BY id
        LIMIT max_rows
    )
    UPDATE vulcan_stream.messages m SET pos = start + batch.n FROM batch WHERE m.id = batch.id;
    GET DIAGNOSTICS assigned = ROW_COUNT;
    IF assigned > 0 THEN
        UPDATE vulcan_stream.lineage SET head = start + assigned;
        PERFORM pg_notify('vulcan_stream', (start + assigned)::text);
    END IF;
    RETURN start + assigned;
END
$$;

-- Retention: deletes, in position order, at most max_rows of the oldest rows published more
-- than `retention` ago, stopping at the first younger one and never the newest row, so that what is deleted is always
-- every row before some position (a reader that finds min(pos) past its position knows that
-- rows it needs are gone). Deleting old rows takes no lock a publisher waits for. Returns the
-- number of rows deleted; called again while it returns max_rows.
CREATE OR REPLACE FUNCTION vulcan_stream.expire(retention interval, max_rows integer) RETURNS integer
LANGUAGE sql AS $$
    WITH oldest AS (
        SELECT pos, created_at FROM vulcan_stream.messages
        WHERE pos IS NOT NULL ORDER BY pos LIMIT max_rows
    ), young AS (
        SELECT min(pos) AS pos FROM oldest WHERE created_at >= now() - retention
    ), gone AS (
        DELETE FROM vulcan_stream.messages m USING oldest
        WHERE m.pos = oldest.pos
          AND oldest.pos < coalesce((SELECT pos FROM young), 9223372036854775807)
          -- The newest row stays, so that an empty table always means nothing was deleted.
          AND oldest.pos < (SELECT max(pos) FROM vulcan_stream.messages)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

INSERT INTO vulcan_stream.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;
