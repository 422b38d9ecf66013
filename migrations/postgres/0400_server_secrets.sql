-- Secrets the server keeps across restarts (e.g. the Server Dialback
-- secret, XEP-0185), by name.
CREATE TABLE server_secrets (
    name       TEXT   NOT NULL PRIMARY KEY,
    value      BYTEA  NOT NULL,
    created_at BIGINT NOT NULL
);
