-- Room archives moved to the shared message archive (archive table, owner =
-- the room's bare JID).
DROP TABLE muc_archive;
