-- One schema for SQLite and PostgreSQL: only BIGINT, DOUBLE PRECISION and TEXT columns, no
-- auto-increment, no dialect-specific syntax. Hashes are 64 hex digits; times are unix milliseconds.

CREATE TABLE run (
    id TEXT PRIMARY KEY,
    run_file TEXT NOT NULL,
    model_config TEXT NOT NULL,
    tokenizer_hash TEXT NOT NULL,
    val_hash TEXT NOT NULL,
    units BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished BIGINT NOT NULL
);

-- Data units: one worker's data for one round.
CREATE TABLE units (
    id BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    tokens BIGINT NOT NULL
);

-- Round r starts from global_hash (and momentum_hash); closed_ms is set when its outer step is committed,
-- in the same transaction that inserts round r + 1.
CREATE TABLE rounds (
    round BIGINT PRIMARY KEY,
    global_hash TEXT NOT NULL,
    momentum_hash TEXT,
    opened_ms BIGINT NOT NULL,
    closed_ms BIGINT,
    contributions BIGINT NOT NULL,
    train_loss DOUBLE PRECISION,
    val_loss DOUBLE PRECISION
);

CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    joined_ms BIGINT NOT NULL,
    active BIGINT NOT NULL,
    rounds_accepted BIGINT NOT NULL,
    bytes_sent BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL
);

-- The order in which units are trained: every unit once per epoch. state: pending | assigned | done.
CREATE TABLE work_queue (
    epoch BIGINT NOT NULL,
    position BIGINT NOT NULL,
    unit BIGINT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (epoch, position)
);

-- state: training | submitted | applied | released (the worker was dropped or missed the deadline).
CREATE TABLE assignments (
    round BIGINT NOT NULL,
    worker TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    position BIGINT NOT NULL,
    unit BIGINT NOT NULL,
    state TEXT NOT NULL,
    assigned_ms BIGINT NOT NULL,
    PRIMARY KEY (round, worker)
);

-- Accepted pseudo-gradients; applied = 1 once the outer step of their round is committed.
CREATE TABLE submissions (
    round BIGINT NOT NULL,
    worker TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    unit BIGINT NOT NULL,
    delta_hash TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    train_loss DOUBLE PRECISION,
    received_ms BIGINT NOT NULL,
    applied BIGINT NOT NULL,
    PRIMARY KEY (round, worker)
);

-- Rejections and late submissions by reason, so they survive restarts.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
