DROP TABLE reading_conflicts;
DROP TABLE reading_ids;
