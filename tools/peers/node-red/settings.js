// Node-RED's settings for the benchmark peer: what a competent hobbyist sets up, no more. One pg
// pool for the whole process, shared with the function nodes through functionGlobalContext (16
// connections, as the seed design's GORM pool); the editor stays on (hobbyists use it), on
// localhost only; log warnings and errors only, so logging costs no more than the seed's.
const { Pool } = require("pg");

const pool = new Pool({
  connectionString: process.env.NODE_RED_DATABASE_URL,
  max: Number(process.env.NODE_RED_PG_POOL || 16),
});
pool.on("error", (err) => console.error("pg pool:", err.message));

module.exports = {
  uiHost: "127.0.0.1",
  uiPort: Number(process.env.NODE_RED_PORT || 1880),
  flowFile: "flows.json",
  flowFilePretty: true,
  credentialSecret: false,
  functionGlobalContext: { pgPool: pool },
  logging: { console: { level: "warn", metrics: false, audit: false } },
  editorTheme: { projects: { enabled: false } },
  diagnostics: { enabled: false },
  telemetry: { enabled: false },
};
