//! The web dashboard and the API docs viewer, served from the binary: `/` (the dashboard's page),
//! `/docs` (Swagger UI over both services' OpenAPI documents) and `/ui/<version>/...` (the
//! dashboard's ES modules and CSS, and the vendored uPlot and Swagger UI from `web/vendor/`,
//! fetched by `scripts/vendor-web`). Nothing is read from disk or the network at run time.
//!
//! These routes are public: the page itself signs in, with an app token kept in the browser's
//! sessionStorage and sent as a bearer header to the API. Asset URLs carry a hash of every asset
//! (`<version>`), so browsers may keep them for a year and a new build is fetched anew; the two
//! pages are never cached, so they always name the current version.

use std::hash::Hasher;
use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, web};

/// The routes served here, as the router names them: all public (see `access`).
pub const PUBLIC_ROUTES: &[&str] = &["/", "/docs", "/ui/{path:.*}"];

/// The dashboard's own pages may run only their own scripts and styles and talk only to this
/// origin; nothing inline, nothing framed.
const DASHBOARD_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Swagger UI's React components set `style` attributes in its markup (which `style-src 'self'`
/// blocks) and draw its icons as `data:` images; its scripts stay as strict as the dashboard's.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Asset URLs with the current version: a year, never revalidated.
const CACHE_VERSIONED: &str = "public, max-age=31536000, immutable";
/// The pages, and an asset asked for under another version (a page loaded before an upgrade):
/// always asked again.
const CACHE_NEVER: &str = "no-cache";

/// A file served under `/ui/<version>/`.
struct Asset {
    /// Its path under `/ui/<version>/`.
    path: &'static str,
    body: &'static [u8],
}

/// `asset!("app.js" => "ui/app.js")`: served as `/ui/<version>/app.js` from `web/ui/app.js`.
macro_rules! asset {
    ($path:literal => $file:literal) => {
        Asset {
            path: $path,
            body: include_bytes!(concat!("../web/", $file)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("api.js" => "ui/api.js"),
    asset!("app.js" => "ui/app.js"),
    asset!("chart.js" => "ui/chart.js"),
    asset!("commands.js" => "ui/commands.js"),
    asset!("device.js" => "ui/device.js"),
    asset!("docs.js" => "ui/docs.js"),
    asset!("dom.js" => "ui/dom.js"),
    asset!("fleet.js" => "ui/fleet.js"),
    asset!("live.js" => "ui/live.js"),
    asset!("state.js" => "ui/state.js"),
    asset!("style.css" => "ui/style.css"),
    asset!("docs.css" => "ui/docs.css"),
    asset!("icon.svg" => "ui/icon.svg"),
    asset!("vendor/uplot/uPlot.iife.min.js" => "vendor/uplot/uPlot.iife.min.js"),
    asset!("vendor/uplot/uPlot.min.css" => "vendor/uplot/uPlot.min.css"),
    asset!("vendor/swagger-ui-dist/swagger-ui-bundle.js" => "vendor/swagger-ui-dist/swagger-ui-bundle.js"),
    asset!("vendor/swagger-ui-dist/swagger-ui-standalone-preset.js" => "vendor/swagger-ui-dist/swagger-ui-standalone-preset.js"),
    asset!("vendor/swagger-ui-dist/swagger-ui.css" => "vendor/swagger-ui-dist/swagger-ui.css"),
];

const DASHBOARD_HTML: &str = include_str!("../web/index.html");
const DOCS_HTML: &str = include_str!("../web/docs.html");

/// What the pages write where an asset's URL begins.
const UI_PLACEHOLDER: &str = "{{ui}}";

/// A hash of every asset (FNV-1a, 64 bits: a cache key, not a security measure), the same for
/// every replica of one build.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hash = Fnv1a::default();
    for asset in ASSETS {
        hash.write(asset.path.as_bytes());
        hash.write(asset.body);
    }
    format!("{:016x}", hash.finish())
});

static PAGES: LazyLock<(String, String)> = LazyLock::new(|| {
    let ui = format!("/ui/{}", *VERSION);
    (
        DASHBOARD_HTML.replace(UI_PLACEHOLDER, &ui),
        DOCS_HTML.replace(UI_PLACEHOLDER, &ui),
    )
});

#[derive(Default)]
struct Fnv1a(Option<u64>);

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = self.0.unwrap_or(0xcbf2_9ce4_8422_2325);
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = Some(hash);
    }

    fn finish(&self) -> u64 {
        self.0.unwrap_or(0xcbf2_9ce4_8422_2325)
    }
}

/// Mounts the pages and the assets (`startup` makes them public).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(dashboard_page))
        .route("/docs", web::get().to(docs_page))
        .route("/ui/{path:.*}", web::get().to(ui_asset));
}

async fn dashboard_page() -> HttpResponse {
    page(&PAGES.0, DASHBOARD_CSP)
}

async fn docs_page() -> HttpResponse {
    page(&PAGES.1, DOCS_CSP)
}

fn page(html: &'static str, csp: &'static str) -> HttpResponse {
    let mut response = HttpResponse::Ok();
    response
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, CACHE_NEVER));
    security_headers(&mut response, csp);
    response.body(html)
}

/// `/ui/<version>/<path>`: the asset, cached for a year when `<version>` is this build's.
async fn ui_asset(path: web::Path<String>) -> HttpResponse {
    let requested = path.into_inner();
    let (version, file) = requested.split_once('/').unwrap_or(("", &requested));
    let Some(asset) = ASSETS.iter().find(|a| a.path == file) else {
        let mut response = HttpResponse::NotFound();
        security_headers(&mut response, DASHBOARD_CSP);
        return response
            .content_type("text/plain; charset=utf-8")
            .body("no such file");
    };
    let cache = if version == VERSION.as_str() {
        CACHE_VERSIONED
    } else {
        CACHE_NEVER
    };
    let mut response = HttpResponse::Ok();
    response
        .content_type(content_type(asset.path))
        .insert_header((header::CACHE_CONTROL, cache));
    security_headers(&mut response, DASHBOARD_CSP);
    response.body(asset.body)
}

fn security_headers(response: &mut actix_web::HttpResponseBuilder, csp: &'static str) {
    response
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(csp),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("html") => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_known_content_type_and_pages_name_this_version() {
        for asset in ASSETS {
            assert_ne!(
                content_type(asset.path),
                "application/octet-stream",
                "{}",
                asset.path
            );
        }
        assert!(!PAGES.0.contains(UI_PLACEHOLDER));
        assert!(PAGES.0.contains(&format!("/ui/{}/app.js", *VERSION)));
        assert!(PAGES.1.contains(&format!("/ui/{}/docs.js", *VERSION)));
        assert_eq!(VERSION.len(), 16);
    }

    #[test]
    fn pages_run_no_inline_script() {
        for html in [DASHBOARD_HTML, DOCS_HTML] {
            for tag in html.split("<script").skip(1) {
                let open = tag.split('>').next().unwrap_or_default();
                assert!(open.contains("src="), "an inline <script>: {open}");
            }
            let handler = html.match_indices(" on").any(|(at, _)| {
                let rest = &html[at + 3..];
                let name = rest.len()
                    - rest
                        .trim_start_matches(|c: char| c.is_ascii_lowercase())
                        .len();
                name > 0 && rest[name..].starts_with('=')
            });
            assert!(!handler, "an inline event handler");
            assert!(!html.contains("style="), "an inline style");
        }
    }
}
