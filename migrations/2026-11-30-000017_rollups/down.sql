DROP TABLE rollups_1d;
DROP TABLE rollups_1h;
DROP TABLE rollups_1m;
DROP TABLE rollup_deltas;
