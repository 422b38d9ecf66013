-- Private XML storage (XEP-0049): per account and namespace, the stored
-- elements of that namespace as XML text.
CREATE TABLE private_storage (
    owner      TEXT    NOT NULL,
    namespace  TEXT    NOT NULL,
    xml        TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, namespace)
) WITHOUT ROWID;
