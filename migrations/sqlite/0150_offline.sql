-- Offline messages (XEP-0160): one row per stored message, delivered in id
-- order at the owner's next available presence, then deleted.
CREATE TABLE offline_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    owner      TEXT    NOT NULL,
    stored_at  INTEGER NOT NULL,
    xml        TEXT    NOT NULL
);
CREATE INDEX offline_messages_owner ON offline_messages (owner, id);
