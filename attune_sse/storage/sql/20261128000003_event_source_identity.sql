-- Which database an event comes from, for the messages that carry events beyond it (events.fanout: redis):
-- an instance reading a Redis stream that another deployment also writes (one key shared by mistake) must
-- not deliver that deployment's events. One row, made once; a restored backup keeps it.
CREATE TABLE attune.event_source (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    singleton boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton),
    created timestamptz NOT NULL DEFAULT now()
);
INSERT INTO attune.event_source DEFAULT VALUES;
