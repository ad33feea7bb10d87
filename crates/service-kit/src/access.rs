//! Deny by default. Every request needs credentials unless the route it will actually reach is one
//! of the service's public routes; and which route that is, is decided here exactly as actix's
//! router decides it: on the percent-decoded path (`/%761/devices` reaches `/v1/devices`), never on
//! the raw request path. A request that reaches no route at all needs credentials too, so nothing
//! about it (not even "there is no such route") is told to a stranger.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::Method;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpMessage, HttpRequest};

use crate::net::KeyedLimit;

/// Why a request carries no token to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` header at all.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    NotBearer,
}

impl BearerError {
    /// What to tell a client that sent a header we cannot read (a missing one is each service's
    /// own sentence: it names the token it wants).
    pub const NOT_BEARER: &'static str = "the Authorization header is not `Bearer <token>`";
}

/// The token of the request's `Authorization: Bearer <token>` header (the scheme in any case).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, BearerError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(BearerError::Missing)?;
    let (scheme, token) = value
        .to_str()
        .map_err(|_| BearerError::NotBearer)?
        .trim()
        .split_once(' ')
        .ok_or(BearerError::NotBearer)?;
    let token = token.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
        Ok(token)
    } else {
        Err(BearerError::NotBearer)
    }
}

/// The ops endpoints and the API description: open to anyone (the edge keeps `/metrics` inside).
pub const OPS_ROUTES: &[&str] = &["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// The route pattern (`/v1/devices/{id}`) this request reaches, whatever its method; `None` when
/// it reaches none. Usable before routing (in an app-wide middleware) as well as after.
pub fn route_of(req: &HttpRequest) -> Option<String> {
    req.resource_map().match_pattern(req.match_info().as_str())
}

/// [`route_of`], worked out once per request: the first middleware to ask keeps the answer in the
/// request's extensions, and the others (the metrics, the access check) read it there.
pub fn matched_route(req: &HttpRequest) -> Option<String> {
    #[derive(Clone)]
    struct MatchedRoute(Option<String>);
    let known = req.extensions().get::<MatchedRoute>().cloned();
    if let Some(MatchedRoute(route)) = known {
        return route;
    }
    let route = route_of(req);
    req.extensions_mut().insert(MatchedRoute(route.clone()));
    route
}

/// The methods `route` takes, as the service's OpenAPI document (in the app's data) describes it;
/// routes it does not describe (the ops endpoints) take GET.
pub fn allowed_methods(req: &HttpRequest, route: &str) -> Vec<&'static str> {
    let described = req
        .app_data::<actix_web::web::Data<utoipa::openapi::OpenApi>>()
        .and_then(|doc| doc.paths.paths.get(route).cloned());
    let Some(item) = described else {
        return vec!["GET"];
    };
    [
        ("GET", item.get.is_some()),
        ("HEAD", item.head.is_some()),
        ("POST", item.post.is_some()),
        ("PUT", item.put.is_some()),
        ("PATCH", item.patch.is_some()),
        ("DELETE", item.delete.is_some()),
    ]
    .into_iter()
    .filter_map(|(method, served)| served.then_some(method))
    .collect()
}

/// The routes a service serves without credentials, by pattern.
#[derive(Debug, Clone)]
pub struct PublicRoutes(Vec<&'static str>);

impl PublicRoutes {
    /// The ops endpoints and the API description, and `more`.
    pub fn ops_and(more: &[&'static str]) -> Self {
        Self(OPS_ROUTES.iter().chain(more).copied().collect())
    }

    pub fn contains(&self, route: Option<&str>) -> bool {
        route.is_some_and(|route| self.0.contains(&route))
    }
}

/// A bounded label for a request's method: anything but the methods HTTP defines is `other`,
/// so `curl -X ANYTHING` cannot mint a metric series.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// How many refused requests (bad or missing credentials) one client address may make. A forged
/// token costs a full signature check; past this budget a client is answered 429 before any check,
/// for as long as its budget takes to refill. Refusals only: a client whose requests succeed never
/// meets this limit, however many it sends.
pub struct RefusalLimit {
    budget: KeyedLimit,
    /// Clients over their budget, until when. Only clients caught refusing sit here, and entries
    /// are dropped once past, so its size is bounded by the abusers of the last few seconds.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

/// More than this many blocked clients at once: expired entries are swept before adding one.
const SWEEP_ABOVE: usize = 1_024;

impl RefusalLimit {
    /// `per_second == 0` turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            budget: KeyedLimit::new(per_second, burst),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `client` is over its budget of refusals.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let Some(client) = client else { return Ok(()) };
        let Ok(mut blocked) = self.blocked.lock() else {
            return Ok(());
        };
        match blocked.get(&client) {
            Some(until) => match until.checked_duration_since(Instant::now()) {
                Some(wait) if !wait.is_zero() => Err(wait),
                _ => {
                    blocked.remove(&client);
                    Ok(())
                }
            },
            None => Ok(()),
        }
    }

    /// Counts one refusal against `client`; once over budget it is blocked for the refill time.
    pub fn record(&self, client: Option<IpAddr>) {
        let Some(client) = client else { return };
        let Err(wait) = self.budget.check(&client.to_string()) else {
            return;
        };
        let Ok(mut blocked) = self.blocked.lock() else {
            return;
        };
        let now = Instant::now();
        if blocked.len() >= SWEEP_ABOVE {
            blocked.retain(|_, until| *until > now);
        }
        blocked.insert(client, now + wait.max(Duration::from_secs(1)));
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test as actix_test;
    use actix_web::{App, HttpResponse, web};

    use super::*;

    #[test]
    fn bearer_headers_parse() {
        let token = |value: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(
                    header::AUTHORIZATION,
                    header::HeaderValue::from_static(value),
                );
            }
            bearer_token(&headers).map(str::to_owned)
        };
        assert_eq!(token(Some("Bearer abc")), Ok("abc".to_owned()));
        assert_eq!(token(Some("bearer   abc ")), Ok("abc".to_owned()));
        assert_eq!(token(Some("Basic abc")), Err(BearerError::NotBearer));
        assert_eq!(token(Some("Bearer ")), Err(BearerError::NotBearer));
        assert_eq!(token(Some("abc")), Err(BearerError::NotBearer));
        assert_eq!(token(None), Err(BearerError::Missing));
    }

    /// What `route_of` says, from inside the app, for a request that went where the router sent it.
    async fn report(req: HttpRequest) -> HttpResponse {
        HttpResponse::Ok().body(route_of(&req).unwrap_or_else(|| "none".into()))
    }

    #[actix_web::test]
    async fn the_route_is_found_as_the_router_finds_it() {
        let app = actix_test::init_service(
            App::new()
                .route("/v1/devices/{id}", web::get().to(report))
                .default_service(web::to(report)),
        )
        .await;
        for (uri, reaches) in [
            ("/v1/devices/a", "/v1/devices/{id}"),
            ("/%761/devices/a", "/v1/devices/{id}"),
            ("/v%31/devices/a", "/v1/devices/{id}"),
            ("/v1/devices/a%2Fb", "/v1/devices/{id}"),
            ("/V1/devices/a", "none"),
            ("//v1/devices/a", "none"),
            ("/v1/./devices/a", "none"),
            ("/v1/devices/a/", "none"),
        ] {
            let response = actix_test::call_service(
                &app,
                actix_test::TestRequest::get().uri(uri).to_request(),
            )
            .await;
            assert_eq!(actix_test::read_body(response).await, reaches, "{uri}");
        }
        // a wrong method still names the path's route (the default service answers it)
        let response = actix_test::call_service(
            &app,
            actix_test::TestRequest::put()
                .uri("/v1/devices/a")
                .to_request(),
        )
        .await;
        assert_eq!(actix_test::read_body(response).await, "/v1/devices/{id}");
    }

    #[test]
    fn refusals_over_budget_block_the_client_for_a_while() {
        let limit = RefusalLimit::new(1, 3);
        let client = Some(IpAddr::from([192, 0, 2, 7]));
        for _ in 0..3 {
            assert!(limit.check(client).is_ok());
            limit.record(client);
        }
        assert!(
            limit.check(client).is_ok(),
            "the budget is spent, not exceeded"
        );
        limit.record(client);
        assert!(limit.check(client).is_err());
        assert!(limit.check(Some(IpAddr::from([192, 0, 2, 8]))).is_ok());
        assert!(RefusalLimit::new(0, 0).check(client).is_ok());
    }
}
