-- vCard-temp (XEP-0054): one vCard per account, stored as XML text.
CREATE TABLE vcards (
    owner      TEXT    NOT NULL PRIMARY KEY,
    xml        TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
