-- cqrs.uuidv7(): RFC 9562 version 7, time-ordered, monotonic per backend.
CREATE TEMP TABLE u AS
SELECT n, cqrs.uuidv7() AS id FROM generate_series(1, 20000) AS n;

-- Version nibble 7 and variant bits 10 on every value.
SELECT count(*) FILTER (WHERE substr(id::text, 15, 1) <> '7') AS bad_version,
       count(*) FILTER (WHERE substr(id::text, 20, 1) NOT IN ('8', '9', 'a', 'b')) AS bad_variant
  FROM u;

-- All distinct, and strictly increasing in the order they were made, even
-- though 20000 of them fall into a handful of milliseconds.
SELECT count(DISTINCT id) = 20000 AS all_distinct FROM u;
SELECT count(*) AS out_of_order
  FROM (SELECT id, lag(id) OVER (ORDER BY n) AS prev FROM u) s
 WHERE id <= prev;

-- The first 48 bits are the Unix time in milliseconds.
SELECT abs(extract(epoch FROM clock_timestamp()) * 1000
           - ('x' || substr(replace(cqrs.uuidv7()::text, '-', ''), 1, 12))::bit(48)::bigint) < 60000
       AS timestamp_is_now;

-- The random tail differs between consecutive values.
SELECT count(*) AS repeated_tails
  FROM (SELECT right(id::text, 12) AS tail,
               lag(right(id::text, 12)) OVER (ORDER BY n) AS prev FROM u) s
 WHERE tail = prev;
