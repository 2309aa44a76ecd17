-- Trust: spot checks, judgements, reputation, receipts and the double-entry ledger. Ledger, receipts and
-- round roots are append-only: the coordinator has no code path that updates or deletes them.

-- chain: the committed state hashes (comma-separated); challenge: the segment to prove (NULL: none);
-- spot_check: NULL (not challenged) | pending | passed | failed: <why>; content_hash: blake3 of the decoded
-- values (replays re-encode an old Δ with new metadata); the rest is set when the round is judged.
ALTER TABLE submissions ADD COLUMN chain TEXT;
ALTER TABLE submissions ADD COLUMN challenge BIGINT;
ALTER TABLE submissions ADD COLUMN spot_check TEXT;
ALTER TABLE submissions ADD COLUMN content_hash TEXT;
ALTER TABLE submissions ADD COLUMN verdict TEXT;
ALTER TABLE submissions ADD COLUMN score DOUBLE PRECISION;
ALTER TABLE submissions ADD COLUMN credits BIGINT;
ALTER TABLE submissions ADD COLUMN gain_random DOUBLE PRECISION;
ALTER TABLE submissions ADD COLUMN gain_assigned DOUBLE PRECISION;
ALTER TABLE submissions ADD COLUMN similarity DOUBLE PRECISION;
ALTER TABLE submissions ADD COLUMN norm DOUBLE PRECISION;

-- Request nonces seen within the signature window (pruned after it).
CREATE TABLE nonces (
    worker TEXT NOT NULL,
    nonce TEXT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    PRIMARY KEY (worker, nonce)
);

-- Per identity, carried over from an earlier run's store when the run file names one.
CREATE TABLE reputation (
    worker TEXT PRIMARY KEY,
    rating DOUBLE PRECISION NOT NULL,
    accepted BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- One signed receipt per judged submission; position is its leaf index in its round's Merkle tree.
CREATE TABLE receipts (
    round BIGINT NOT NULL,
    worker TEXT NOT NULL,
    position BIGINT NOT NULL,
    receipt TEXT NOT NULL,
    PRIMARY KEY (round, worker)
);

CREATE TABLE round_roots (
    round BIGINT PRIMARY KEY,
    root TEXT NOT NULL,
    receipts BIGINT NOT NULL,
    signed TEXT NOT NULL
);

-- Double entry: every posting has a matching one of opposite sign in the same transaction (same memo).
CREATE TABLE ledger (
    seq BIGINT PRIMARY KEY,
    round BIGINT,
    account TEXT NOT NULL,
    amount BIGINT NOT NULL,
    memo TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
