// /docs: Swagger UI (vendored) over both services' OpenAPI documents, query-api's
// (/openapi.json) and ingest-http's (/ingest/openapi.json, where Traefik routes it). Only the
// documents this address serves are offered: query-api run alone has only its own.

const DOCUMENTS = [
  { url: "/openapi.json", name: "query-api: devices, readings, commands (apps)" },
  { url: "/ingest/openapi.json", name: "ingest-http: readings and commands (devices)" },
];

async function reachable(doc) {
  try {
    const response = await fetch(doc.url, { headers: { Accept: "application/json" }, cache: "no-store" });
    return response.ok && (response.headers.get("Content-Type") || "").includes("json");
  } catch {
    return false;
  }
}

async function start() {
  const note = document.getElementById("docs-note");
  const found = [];
  for (const doc of DOCUMENTS) if (await reachable(doc)) found.push(doc);
  if (!found.length) {
    note.textContent = "No API description answers at this address.";
    return;
  }
  const missing = DOCUMENTS.filter((doc) => !found.includes(doc));
  note.textContent = missing.length
    ? `Not served at this address: ${missing.map((d) => d.url).join(", ")} (query-api alone serves only its own; behind Traefik both are).`
    : "Authorize with a token to try a request. The dashboard's sign-in is not shared with this page.";
  window.ui = window.SwaggerUIBundle({
    urls: found,
    "urls.primaryName": found[0].name,
    dom_id: "#swagger-ui",
    deepLinking: false,
    // no badge fetched from the validator's web site: nothing but this server is asked
    validatorUrl: null,
    presets: [window.SwaggerUIBundle.presets.apis, window.SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
}

// the bundles are classic deferred scripts: they have run before this module does
start();
