//! The dashboard's pages and assets: served from the binary without a token (the page signs in
//! itself), with their content types, caching by version, and a Content-Security-Policy that runs
//! only this origin's scripts; nothing else opened to strangers by them.

use reqwest::header::HeaderMap;

use crate::start_empty;

/// A GET without a token: status, headers, body.
async fn fetch(url: &str) -> (u16, HeaderMap, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_without_a_token() {
    let api = start_empty(|_| {}).await;

    let (status, headers, page) = fetch(&format!("{}/", api.url)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    let csp = header(&headers, "content-security-policy");
    assert!(
        csp.starts_with("default-src 'self'; script-src 'self';"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    // the assets' URLs carry the build's version
    let at = page.find("/ui/").expect("an asset URL in the page");
    let version = page[at + 4..].split('/').next().unwrap().to_owned();
    assert_eq!(version.len(), 16, "{version}");

    for (path, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        (
            "vendor/uplot/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "vendor/swagger-ui-dist/swagger-ui-bundle.js",
            "text/javascript; charset=utf-8",
        ),
    ] {
        let (status, headers, body) = fetch(&format!("{}/ui/{version}/{path}", api.url)).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(
            header(&headers, "cache-control"),
            "public, max-age=31536000, immutable",
            "{path}"
        );
        assert!(!body.is_empty(), "{path}");
    }
    // an asset under another version (a page from before an upgrade) is served, but not kept
    let (status, headers, _) = fetch(&format!("{}/ui/0000000000000000/app.js", api.url)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "cache-control"), "no-cache");
    let (status, _, _) = fetch(&format!("{}/ui/{version}/nothing.js", api.url)).await;
    assert_eq!(status, 404);

    let (status, headers, docs) = fetch(&format!("{}/docs", api.url)).await;
    assert_eq!(status, 200);
    assert!(docs.contains("swagger-ui-bundle.js"));
    let csp = header(&headers, "content-security-policy");
    assert!(csp.contains("script-src 'self';"), "{csp}");

    // only these: the API and look-alike paths still need a token
    for path in ["/v1/devices", "/v1/me", "/uix", "/docs/", "/index.html"] {
        let (status, _, _) = fetch(&format!("{}{path}", api.url)).await;
        assert_eq!(status, 401, "{path}");
    }
    let posted = api
        .client
        .post(format!("{}/", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 405, "the page takes GET only");
}
