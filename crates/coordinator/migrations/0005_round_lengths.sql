-- Issue 12: rounds of varying length. A data unit is `[inner] unit_steps` steps of one worker's data, and
-- an assignment trains every unit of its round's length, in `seq` order (one unit when rounds are equal and
-- unit_steps is left at its default, as before). The assignment row keeps its first unit's epoch, position
-- and index.
CREATE TABLE assignment_units (
    round BIGINT NOT NULL,
    worker TEXT NOT NULL,
    seq BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    position BIGINT NOT NULL,
    unit BIGINT NOT NULL,
    PRIMARY KEY (round, worker, seq)
);
INSERT INTO assignment_units (round, worker, seq, epoch, position, unit)
    SELECT round, worker, 0, epoch, position, unit FROM assignments;
CREATE INDEX assignment_units_by_entry ON assignment_units (epoch, position);
