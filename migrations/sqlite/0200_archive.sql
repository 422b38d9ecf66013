-- Message archive (XEP-0313). One row per archived message per archive
-- owner (a user's bare JID, or a MUC room JID). The table is the primary-key
-- B-tree itself (WITHOUT ROWID): an owner's messages are contiguous and in
-- archive order, so a page is one range read.
--   id        time-ordered archive id (epoch microseconds, bumped to stay
--             strictly increasing); also the message's receive time
--   tag       random 31-bit part of the public id (ids are unpredictable)
--   with_bare the other party's bare JID (the owner itself for self-messages)
--   with_res  the other party's resource ('' if none)
--   outgoing  1 if the owner sent it
--   stanza    the message as received, serialised XML
CREATE TABLE archive (
    owner     TEXT    NOT NULL,
    id        INTEGER NOT NULL,
    tag       INTEGER NOT NULL,
    with_bare TEXT    NOT NULL,
    with_res  TEXT    NOT NULL,
    outgoing  INTEGER NOT NULL,
    stanza    BLOB    NOT NULL,
    PRIMARY KEY (owner, id)
) WITHOUT ROWID;

-- The only secondary index: the `with` filter, in archive order.
CREATE INDEX archive_with ON archive (owner, with_bare, id);

-- Per-owner preferences (XEP-0441) and retention. NULL default_mode means
-- the server default; NULL retention_secs means the server default.
CREATE TABLE archive_prefs (
    owner          TEXT    NOT NULL PRIMARY KEY,
    default_mode   TEXT,
    always_jids    TEXT    NOT NULL DEFAULT '',
    never_jids     TEXT    NOT NULL DEFAULT '',
    retention_secs INTEGER
) WITHOUT ROWID;

-- Highest archive id ever committed: ids stay increasing across restarts
-- even if the clock goes back.
CREATE TABLE archive_meta (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO archive_meta (name, value) VALUES ('max_id', 0);
