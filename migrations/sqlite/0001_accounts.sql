-- Accounts: SCRAM keys only, never a password (RFC 5802 section 5.1 storage).
CREATE TABLE accounts (
    domain        TEXT    NOT NULL,
    username      TEXT    NOT NULL,
    sha1_salt     BLOB    NOT NULL,
    sha1_iter     INTEGER NOT NULL,
    sha1_stored   BLOB    NOT NULL,
    sha1_server   BLOB    NOT NULL,
    sha256_salt   BLOB    NOT NULL,
    sha256_iter   INTEGER NOT NULL,
    sha256_stored BLOB    NOT NULL,
    sha256_server BLOB    NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (domain, username)
) WITHOUT ROWID;
