-- Compressed pseudo-gradients: seq is a submission's place in its round's acceptance order (the order in
-- which the round's sum is accumulated, and replayed after a restart); fp32_bytes what the same tensors
-- would take uncompressed, for the compression ratio.
ALTER TABLE submissions ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE submissions ADD COLUMN fp32_bytes BIGINT NOT NULL DEFAULT 0;
