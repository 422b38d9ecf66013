-- Message archive (XEP-0313). One row per archived message per archive
-- owner (a user's bare JID, or a MUC room JID); see the SQLite migration for
-- the meaning of the columns. The primary key (owner, id) serves every page
-- read; the one secondary index serves the `with` filter.
CREATE TABLE archive (
    owner     TEXT     NOT NULL,
    id        BIGINT   NOT NULL,
    tag       INTEGER  NOT NULL,
    with_bare TEXT     NOT NULL,
    with_res  TEXT     NOT NULL,
    outgoing  BOOLEAN  NOT NULL,
    stanza    BYTEA    NOT NULL,
    PRIMARY KEY (owner, id)
);

CREATE INDEX archive_with ON archive (owner, with_bare, id);

CREATE TABLE archive_prefs (
    owner          TEXT    NOT NULL PRIMARY KEY,
    default_mode   TEXT,
    always_jids    TEXT    NOT NULL DEFAULT '',
    never_jids     TEXT    NOT NULL DEFAULT '',
    retention_secs BIGINT
);

CREATE TABLE archive_meta (
    name  TEXT   NOT NULL PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO archive_meta (name, value) VALUES ('max_id', 0);
