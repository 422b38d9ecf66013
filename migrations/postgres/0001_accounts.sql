-- Accounts: SCRAM keys only, never a password (RFC 5802 section 5.1 storage).
CREATE TABLE accounts (
    domain        TEXT   NOT NULL,
    username      TEXT   NOT NULL,
    sha1_salt     BYTEA  NOT NULL,
    sha1_iter     BIGINT NOT NULL,
    sha1_stored   BYTEA  NOT NULL,
    sha1_server   BYTEA  NOT NULL,
    sha256_salt   BYTEA  NOT NULL,
    sha256_iter   BIGINT NOT NULL,
    sha256_stored BYTEA  NOT NULL,
    sha256_server BYTEA  NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (domain, username)
);
