-- vulcan-stream durable (table) mode: schema version 2, applied after 001_schema.sql.
--
-- Publishing costs less. Version 1's check walked the payload's fields with a query loop
-- (json_each) for every row: about 50 µs of the 70 µs that a row's check cost. Now that walk is
-- skipped when a cheap look at the text proves it would find nothing: no backslash (so no key
-- is spelled with escapes, and every quoted string followed by a colon is a key) and no agent
-- field name, in any case, followed by a value that starts as neither a string nor null. Every
-- row is still checked as the server checks it, with the same errors.
--
-- The check also refuses a payload nested deeper than agents decode and the server forwards
-- (vulcan_stream.max_depth(), 10,000 levels), with its own error, where PostgreSQL's parser
-- either let it through or, far deeper, failed with a bare "stack depth limit exceeded".
--
-- Like 001_schema.sql, the file is idempotent and may be applied by hand in one transaction
-- (`psql -1 -f`), after 001_schema.sql.

SELECT pg_advisory_xact_lock(30323, 1);

-- The deepest nesting of objects and arrays in a payload (the outer object is level 1): what
-- agents decode (Go's encoding/json stops past 10,000 levels), and what the server forwards.
CREATE OR REPLACE FUNCTION vulcan_stream.max_depth() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 10000';

-- The payload rules of the stream, the same as the server's (see 001_schema.sql), plus the
-- depth.
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
    WHEN statement_too_complex THEN
        RAISE EXCEPTION 'vulcan_stream: payload on channel % is nested deeper than % levels, which agents do not decode',
            quote_literal(NEW.channel), vulcan_stream.max_depth()
            USING ERRCODE = 'program_limit_exceeded';
    END;
    IF json_typeof(doc) <> 'object' THEN
        RAISE EXCEPTION 'vulcan_stream: payload on channel % is a JSON %, not an object', quote_literal(NEW.channel), json_typeof(doc)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Without a backslash, a quoted string followed by a colon is a key; so when no agent field
    -- name is followed by anything but a string or null, no field can break the rule and the
    -- walk (the costly part of the check) is skipped. A name in a nested object only costs the
    -- walk.
    IF strpos(NEW.payload, E'\\') > 0
       OR NEW.payload ~* U&'"(?:action|chec[k!212A]_id|agent_id|[s!017F]can_id)"[ \t\n\r]*:[ \t\n\r]*[^"n \t\n\r]' UESCAPE '!' THEN
        FOR field IN SELECT key, value FROM json_each(doc) LOOP
            IF translate(field.key, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' || U&'\212A\017F', 'abcdefghijklmnopqrstuvwxyzks')
                   IN ('action', 'check_id', 'agent_id', 'scan_id')
               AND json_typeof(field.value) NOT IN ('string', 'null') THEN
                RAISE EXCEPTION 'vulcan_stream: payload field % on channel % is a JSON %, agents need a string or null',
                    quote_literal(field.key), quote_literal(NEW.channel), json_typeof(field.value)
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END IF;
    -- Counting brackets (those inside strings too) is cheap and bounds the depth from above;
    -- only a payload with that many is walked.
    IF octet_length(NEW.payload) - octet_length(translate(NEW.payload, '[{', '')) > vulcan_stream.max_depth()
       AND jsonb_path_exists(NEW.payload::jsonb,
               ('strict $.**{' || vulcan_stream.max_depth() || ' to last} ? (@.type() == "object" || @.type() == "array")')::jsonpath) THEN
        RAISE EXCEPTION 'vulcan_stream: payload on channel % is nested deeper than % levels, which agents do not decode',
            quote_literal(NEW.channel), vulcan_stream.max_depth()
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    -- Positions are the sequencer's to give.
    NEW.pos := NULL;
    RETURN NEW;
END
$$;

INSERT INTO vulcan_stream.schema_version (version) VALUES (2) ON CONFLICT DO NOTHING;
