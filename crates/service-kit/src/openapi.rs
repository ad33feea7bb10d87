//! What the OpenAPI descriptions of ingest-http and query-api share, so that each says what the
//! server does and not only what its handlers do: the bearer scheme, the answers the token check,
//! the rate limit and the dependencies add to every protected operation (401, 403, 429, 503), and
//! the ops endpoints, which need no token.
//!
//! utoipa-actix-web adds a route's operation when the route is registered, after `ApiDoc::openapi()`
//! (and its modifiers) ran; so this is applied to the finished document, [`complete`].

use std::collections::BTreeMap;

use utoipa::OpenApi;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Type};

use crate::ErrorBody;

/// Device ids and metric names (`models::DeviceId`, `models::MetricName`). utoipa's attributes take
/// only literals, so the routes spell it out; their tests compare it with this.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// The name of the bearer security scheme in `components.securitySchemes`.
pub const BEARER: &str = "bearer";

/// An answer every protected operation of a service can give besides its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Common {
    /// 401: no token, or not a valid one.
    Unauthorized,
    /// 403: a valid token whose role may not do this.
    Forbidden,
    /// 429: over the token's (or device's) rate limit.
    TooManyRequests,
    /// 503: a dependency (RabbitMQ, PostgreSQL) cannot take the request now.
    Unavailable,
}

impl Common {
    /// Every one: what an operation behind the token check and the rate limit, served only while
    /// the service's dependencies are, can answer.
    pub const ALL: [Common; 4] = [
        Common::Unauthorized,
        Common::Forbidden,
        Common::TooManyRequests,
        Common::Unavailable,
    ];

    fn status(self) -> &'static str {
        match self {
            Common::Unauthorized => "401",
            Common::Forbidden => "403",
            Common::TooManyRequests => "429",
            Common::Unavailable => "503",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Common::Unauthorized => "Unauthorized",
            Common::Forbidden => "Forbidden",
            Common::TooManyRequests => "TooManyRequests",
            Common::Unavailable => "Unavailable",
        }
    }

    fn response(self) -> Response {
        let error_body = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build();
        let retry_after = || {
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some("Seconds to wait before trying again"))
                .build()
        };
        let response = ResponseBuilder::new().content("application/json", error_body);
        match self {
            Common::Unauthorized => response
                .description(
                    "No `Authorization: Bearer <token>` header, or a token that is not valid \
                     (malformed, badly signed, expired, revoked)",
                )
                .header(
                    "WWW-Authenticate",
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                        .description(Some(
                            "`Bearer realm=\"sensorhub\"`, with `error=\"invalid_token\"` when a \
                             token was sent",
                        ))
                        .build(),
                ),
            Common::Forbidden => {
                response.description("A valid token that may not do this (its role is not enough)")
            }
            Common::TooManyRequests => response
                .description("Over the rate limit; nothing was done")
                .header("Retry-After", retry_after()),
            Common::Unavailable => response
                .description(
                    "A dependency (RabbitMQ, PostgreSQL) cannot take the request now; nothing was \
                     done: try again after `Retry-After` seconds",
                )
                .header("Retry-After", retry_after()),
        }
        .build()
    }
}

/// Finishes a service's description: every operation generated from its routes needs the bearer
/// token and may answer `common` besides what its own `responses(...)` list (an operation's own
/// description of a status wins); then the ops endpoints, open to anyone, are added.
pub fn complete(mut doc: utoipa::openapi::OpenApi, common: &[Common]) -> utoipa::openapi::OpenApi {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A token from `sensorctl` (or `POST /v1/devices`): a device's token to write \
                     readings, a reader or admin token to read, an admin token to manage devices",
                ))
                .build(),
        ),
    );
    for answer in common {
        components
            .responses
            .insert(answer.name().to_owned(), RefOr::T(answer.response()));
    }
    if !components.schemas.contains_key("ErrorBody") {
        components.schemas.insert(
            "ErrorBody".to_owned(),
            <ErrorBody as utoipa::PartialSchema>::schema(),
        );
    }
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    for item in doc.paths.paths.values_mut() {
        for operation in operations(item) {
            for answer in common {
                operation
                    .responses
                    .responses
                    .entry(answer.status().to_owned())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name(answer.name())));
            }
        }
    }

    let mut ops = OpsDoc::openapi();
    for item in ops.paths.paths.values_mut() {
        for operation in operations(item) {
            // an empty list, not an empty requirement: no token is asked for at all
            operation.security = Some(Vec::new());
        }
    }
    doc.merge(ops);
    doc
}

fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
        item.query.as_mut(),
    ]
    .into_iter()
    .flatten()
    .chain(item.additional_operations.values_mut())
}

/// The ops endpoints of [`crate::Ops`], as every service serves them.
#[derive(OpenApi)]
#[openapi(
    paths(
        ops_paths::healthz,
        ops_paths::readyz,
        ops_paths::metrics,
        ops_paths::openapi_json
    ),
    components(schemas(Alive, ReadinessReport))
)]
struct OpsDoc;

#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "describes the answer of ops::healthz")]
struct Alive {
    #[schema(example = "alive")]
    status: String,
}

#[derive(utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "describes crate::ops::ReadinessReport, which is serialized by hand"
)]
struct ReadinessReport {
    #[schema(pattern = "^(ready|not_ready)$", example = "ready")]
    status: String,
    /// Each check's outcome: `up`, or `down: <why>`.
    #[schema(example = json!({"postgres": "up"}))]
    checks: BTreeMap<String, String>,
}

/// The ops endpoints' descriptions: functions that exist for their `#[utoipa::path]` alone.
mod ops_paths {
    #![allow(
        dead_code,
        reason = "describes routes the ops server serves; only their OpenAPI paths are used"
    )]

    use super::{Alive, ReadinessReport};

    /// The process is alive (says nothing about its connections).
    ///
    /// Like `/readyz` and `/metrics`: on the internal network only in the deployment (Traefik does
    /// not route it).
    #[utoipa::path(get, path = "/healthz", tag = "ops",
        responses((status = 200, description = "Alive", body = Alive)))]
    pub(super) fn healthz() {}

    /// Whether the service can do its work: each of its connections, checked now.
    ///
    /// On the internal network only in the deployment (Traefik does not route it).
    #[utoipa::path(get, path = "/readyz", tag = "ops",
        responses(
            (status = 200, description = "Every check is up", body = ReadinessReport),
            (status = 503, description = "A check is down (named in `checks`); `Retry-After` says when to ask again",
                body = ReadinessReport,
                headers(("Retry-After" = u64, description = "Seconds"))),
        ))]
    pub(super) fn readyz() {}

    /// Prometheus metrics, in the OpenMetrics text format.
    ///
    /// On the internal network only in the deployment (Traefik does not route it).
    #[utoipa::path(get, path = "/metrics", tag = "ops",
        responses((status = 200, description = "The service's metrics",
            body = String, content_type = "application/openmetrics-text")))]
    pub(super) fn metrics() {}

    /// This description.
    #[utoipa::path(get, path = "/openapi.json", tag = "ops",
        responses((status = 200, description = "The OpenAPI 3.1 description of this service",
            body = Object, content_type = "application/json")))]
    pub(super) fn openapi_json() {}
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[derive(OpenApi)]
    #[openapi(paths(protected))]
    struct Doc;

    #[utoipa::path(get, path = "/v1/thing",
        responses((status = 200, description = "ok"), (status = 403, description = "its own")))]
    #[allow(dead_code, reason = "only its OpenAPI path is used")]
    fn protected() {}

    #[test]
    fn protected_operations_get_the_common_answers_and_ops_need_no_token() {
        let doc = complete(
            Doc::openapi(),
            &[
                Common::Unauthorized,
                Common::Forbidden,
                Common::TooManyRequests,
            ],
        );
        let json: Value = serde_json::to_value(&doc).unwrap();
        let responses = &json["paths"]["/v1/thing"]["get"]["responses"];
        assert_eq!(
            responses["401"]["$ref"],
            "#/components/responses/Unauthorized"
        );
        assert_eq!(responses["403"]["description"], "its own");
        assert!(responses["503"].is_null(), "only the answers asked for");
        assert_eq!(json["security"][0][BEARER], serde_json::json!([]));
        assert_eq!(
            json["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert_eq!(
                json["paths"][path]["get"]["security"],
                serde_json::json!([]),
                "{path}"
            );
        }
        assert!(
            json["components"]["responses"]["Unauthorized"]["headers"]["WWW-Authenticate"]
                .is_object()
        );
    }
}
