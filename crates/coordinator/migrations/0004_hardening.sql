-- Issue 11: liveness, vesting, probation, and indexes for the hot queries.

-- Consecutive rounds in which a worker held an assignment it did not deliver, and the first round it may
-- get work again (core::liveness::NoShowPolicy).
ALTER TABLE workers ADD COLUMN no_shows BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN benched_until BIGINT NOT NULL DEFAULT 0;

-- Verified rounds (passed spot checks) since the identity's last proven cheat: probation.
ALTER TABLE reputation ADD COLUMN verified BIGINT NOT NULL DEFAULT 0;

-- Two-phase credit transfers (core::vesting), append-only like the ledger: a `pending` transfer books a
-- judged credit (pool → pending:<worker>); exactly one later `post` (pending → worker) or `void`
-- (pending → pool) row resolves it, naming it in `pending_id` (unique, so it resolves once).
CREATE TABLE transfers (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    pending_id BIGINT,
    round BIGINT NOT NULL,
    worker TEXT NOT NULL,
    amount BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX transfers_resolve_once ON transfers (pending_id);
CREATE INDEX transfers_by_worker ON transfers (worker, kind);

-- Hot queries: the open round's uploads in acceptance order, replay look-ups by content, the queue's next
-- pending entry, a round's assignments by state, balances by account, a worker's receipts, nonce pruning.
CREATE INDEX submissions_by_round_seq ON submissions (round, seq);
CREATE INDEX submissions_by_content ON submissions (content_hash);
CREATE INDEX submissions_by_worker ON submissions (worker, applied);
CREATE INDEX work_queue_by_state ON work_queue (state, epoch, position);
CREATE INDEX assignments_by_round_state ON assignments (round, state);
CREATE INDEX ledger_by_account ON ledger (account);
CREATE INDEX receipts_by_worker ON receipts (worker, round);
CREATE INDEX nonces_by_time ON nonces (timestamp_ms);

-- The residual an upload's worker started from (blake3 of its canonical encoding), committed in the upload
-- with error feedback: the start link of the spot check (agora_verify::binding).
ALTER TABLE submissions ADD COLUMN residual_hash TEXT;
