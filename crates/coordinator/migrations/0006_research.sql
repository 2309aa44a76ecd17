-- Issue 13: the research track. A call for proposals for phase K's recipe is kept in the store of the
-- phase that hosts it (phase K - 1). Entry 0 of a call is the campaign file's own recipe, run as a proxy
-- like every proposal.
CREATE TABLE research_calls (
    phase BIGINT PRIMARY KEY,
    -- Recorded once, when the hosting phase is first seen finished: no proposal is taken from then on.
    closes_ms BIGINT NOT NULL,
    -- Set under the campaign's call lock once the deadline has passed, before the entries to measure are
    -- read: a proposal is refused from then on whatever the clock says.
    closed BIGINT NOT NULL DEFAULT 0,
    settled_ms BIGINT,
    adopted BIGINT
);

CREATE TABLE proposals (
    phase BIGINT NOT NULL,
    id BIGINT NOT NULL,
    researcher TEXT,
    name TEXT NOT NULL,
    patch TEXT NOT NULL,
    -- The signed proposal as received (NULL for entry 0).
    signed TEXT,
    submitted_ms BIGINT NOT NULL,
    proxy_run TEXT,
    val_loss DOUBLE PRECISION,
    failure TEXT,
    rank BIGINT,
    credits BIGINT,
    retained BIGINT,
    -- The coordinator-signed research receipt, once settled.
    receipt TEXT,
    PRIMARY KEY (phase, id)
);
CREATE UNIQUE INDEX proposals_one_per_researcher ON proposals (phase, researcher);
