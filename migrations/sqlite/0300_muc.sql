-- Multi-user chat (XEP-0045): persistent rooms, their affiliations, the
-- per-service secret for occupant ids (XEP-0421), and room archives (XEP-0313).
CREATE TABLE muc_rooms (
    service       TEXT    NOT NULL,
    node          TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    public        INTEGER NOT NULL,
    config        TEXT    NOT NULL,
    subject       TEXT,
    subject_nick  TEXT,
    subject_stamp INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (service, node)
) WITHOUT ROWID;

CREATE TABLE muc_affiliations (
    service     TEXT NOT NULL,
    node        TEXT NOT NULL,
    jid         TEXT NOT NULL,
    affiliation TEXT NOT NULL,
    nick        TEXT,
    reason      TEXT,
    PRIMARY KEY (service, node, jid)
) WITHOUT ROWID;
CREATE INDEX muc_affiliations_by_jid ON muc_affiliations (service, jid, affiliation);

CREATE TABLE muc_secrets (
    service TEXT NOT NULL PRIMARY KEY,
    secret  BLOB NOT NULL
) WITHOUT ROWID;

-- One row per archived room message; the id is the stanza-id (microseconds,
-- strictly increasing per room), so time ranges and paging use the key.
CREATE TABLE muc_archive (
    room        TEXT    NOT NULL,
    id          INTEGER NOT NULL,
    kind        INTEGER NOT NULL,
    nick        TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    occupant_id TEXT    NOT NULL,
    stanza      BLOB    NOT NULL,
    PRIMARY KEY (room, id)
) WITHOUT ROWID;
