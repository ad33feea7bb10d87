//! Who may use RabbitMQ's MQTT plugin (broker mode `rabbitmq`): RabbitMQ's HTTP auth backend
//! (`rabbitmq_auth_backend_http`) asks these routes, so the device registry stays the one source of
//! truth for HTTP and MQTT alike, and a revoked token is refused at the next MQTT login.
//!
//! - `user`: a device logs in with its id as user name, its token as password, **and its id as
//!   client id**. RabbitMQ 3.10 closes the older of two connections with the same client id, so
//!   a device free to choose its client id could throw any other device (or its session) off;
//!   refusing any other client id at login (RabbitMQ passes it along) leaves a device able to
//!   replace only its own connection.
//! - `vhost`: the configured virtual host only.
//! - `resource`: write to (publish) and read from (subscribe) the MQTT exchange; its own
//!   subscription queues (`mqtt-subscription-<id>qos0|1`, named after the client id, which is the
//!   device id). Nothing else.
//! - `topic`: publish exactly `devices/<id>/readings` and answers
//!   `devices/<id>/commands/<command id>/result` (a command id holds no `.`), subscribe exactly
//!   `devices/<id>/commands`. Exactly, not a prefix: the plugin turns `/` into `.` and a device id may contain `.`, so
//!   device `pi` publishing `devices/pi/kitchen/readings` would otherwise be read as device
//!   `pi.kitchen`'s readings.
//!
//! Not routed by Traefik: only RabbitMQ, inside the deployment's network, reaches them.

use std::collections::HashMap;

use actix_web::{HttpResponse, web};
use models::DeviceId;

use crate::api::IngestState;
use crate::device_auth::Writer;
use crate::error::IngestError;

/// Where RabbitMQ's `auth_http.*_path` settings point, under ingest-http's address.
pub const USER_PATH: &str = "/internal/rabbitmq/user";
pub const VHOST_PATH: &str = "/internal/rabbitmq/vhost";
pub const RESOURCE_PATH: &str = "/internal/rabbitmq/resource";
pub const TOPIC_PATH: &str = "/internal/rabbitmq/topic";
pub const PATHS: [&str; 4] = [USER_PATH, VHOST_PATH, RESOURCE_PATH, TOPIC_PATH];

/// What a device may do on RabbitMQ's MQTT plugin.
#[derive(Debug, Clone)]
pub struct MqttRules {
    /// The plugin's `mqtt.exchange` (`<amqp_prefix>.mqtt`).
    pub exchange: String,
    pub vhost: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl From<bool> for Decision {
    fn from(allowed: bool) -> Self {
        if allowed { Self::Allow } else { Self::Deny }
    }
}

impl MqttRules {
    /// The client id a device must connect with: its own id, nothing else.
    pub fn login(&self, user: &str, client_id: Option<&str>) -> Result<DeviceId, String> {
        let device = DeviceId::parse(user).map_err(|e| format!("user name: {e}"))?;
        match client_id {
            Some(id) if id == device.as_str() => Ok(device),
            Some(id) => Err(format!(
                "client id {id:?} is not the device's id (a device connects with its id as client id)"
            )),
            None => Err("no client id (RabbitMQ's MQTT plugin always sends one)".into()),
        }
    }

    pub fn vhost(&self, vhost: &str) -> Decision {
        (vhost == self.vhost).into()
    }

    pub fn resource(
        &self,
        device: &DeviceId,
        vhost: &str,
        kind: &str,
        name: &str,
        permission: &str,
    ) -> Decision {
        if vhost != self.vhost {
            return Decision::Deny;
        }
        match (kind, permission) {
            ("exchange", "write" | "read") => name == self.exchange,
            ("queue", "configure" | "write" | "read") => ["qos0", "qos1"]
                .iter()
                .any(|qos| name == format!("mqtt-subscription-{device}{qos}")),
            _ => false,
        }
        .into()
    }

    pub fn topic(
        &self,
        device: &DeviceId,
        vhost: &str,
        exchange: &str,
        permission: &str,
        routing_key: &str,
    ) -> Decision {
        if vhost != self.vhost || exchange != self.exchange {
            return Decision::Deny;
        }
        match permission {
            "write" => {
                routing_key == format!("devices.{device}.readings")
                    || is_own_answer(device, routing_key)
            }
            "read" => routing_key == format!("devices.{device}.commands"),
            _ => false,
        }
        .into()
    }
}

/// `devices.<device>.commands.<command id>.result`, the command id without a `.`: so the key
/// names no other device however many dots device ids hold.
fn is_own_answer(device: &DeviceId, routing_key: &str) -> bool {
    routing_key
        .strip_prefix(&format!("devices.{device}.commands."))
        .and_then(|rest| rest.strip_suffix(".result"))
        .is_some_and(|command| !command.is_empty() && !command.contains('.'))
}

type Form = web::Form<HashMap<String, String>>;

fn answer(decision: Decision) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain")
        .body(match decision {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        })
}

fn field<'a>(form: &'a Form, name: &str) -> &'a str {
    form.get(name).map(String::as_str).unwrap_or_default()
}

/// The user name of an authorisation question: a device id, or nobody we let in.
fn device_of(form: &Form) -> Option<DeviceId> {
    DeviceId::parse(field(form, "username")).ok()
}

async fn user(
    state: web::Data<IngestState>,
    rules: web::Data<MqttRules>,
    form: Form,
) -> HttpResponse {
    let user = field(&form, "username");
    let client_id = form.get("client_id").map(String::as_str);
    let refused = |reason: &str| {
        tracing::warn!(device.id = %user, client_id = ?client_id, %reason, "MQTT login refused");
        answer(Decision::Deny)
    };
    let device = match rules.login(user, client_id) {
        Ok(device) => device,
        Err(reason) => return refused(&reason),
    };
    match state
        .authenticator
        .admit_token(field(&form, "password"))
        .await
    {
        Ok(Writer::Device { id, .. }) if id == device.as_str() => answer(Decision::Allow),
        Ok(_) => refused("the token is another device's"),
        Err(IngestError::RegistryUnavailable) => {
            // not an answer: RabbitMQ refuses the login and logs the error
            HttpResponse::ServiceUnavailable().body("the device registry is not loaded yet")
        }
        Err(e) => refused(&e.to_string()),
    }
}

async fn vhost(rules: web::Data<MqttRules>, form: Form) -> HttpResponse {
    answer(match device_of(&form) {
        Some(_) => rules.vhost(field(&form, "vhost")),
        None => Decision::Deny,
    })
}

async fn resource(rules: web::Data<MqttRules>, form: Form) -> HttpResponse {
    answer(match device_of(&form) {
        Some(device) => rules.resource(
            &device,
            field(&form, "vhost"),
            field(&form, "resource"),
            field(&form, "name"),
            field(&form, "permission"),
        ),
        None => Decision::Deny,
    })
}

async fn topic(rules: web::Data<MqttRules>, form: Form) -> HttpResponse {
    let decision = match device_of(&form) {
        Some(device) => rules.topic(
            &device,
            field(&form, "vhost"),
            field(&form, "name"),
            field(&form, "permission"),
            field(&form, "routing_key"),
        ),
        None => Decision::Deny,
    };
    if decision == Decision::Deny {
        tracing::info!(
            device.id = field(&form, "username"),
            permission = field(&form, "permission"),
            routing_key = field(&form, "routing_key"),
            "MQTT topic refused"
        );
    }
    answer(decision)
}

/// The four routes, answering for `rules`.
pub fn routes(rules: MqttRules) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(rules))
            .route(USER_PATH, web::post().to(user))
            .route(VHOST_PATH, web::post().to(vhost))
            .route(RESOURCE_PATH, web::post().to(resource))
            .route(TOPIC_PATH, web::post().to(topic));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> MqttRules {
        MqttRules {
            exchange: "sensorhub.mqtt".into(),
            vhost: "/".into(),
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn a_device_connects_only_as_itself() {
        assert_eq!(rules().login("pi-1", Some("pi-1")), Ok(id("pi-1")));
        assert!(rules().login("pi-1", Some("pi-2")).is_err());
        assert!(rules().login("pi-1", Some("ingest-mqtt:1")).is_err());
        assert!(rules().login("pi-1", None).is_err());
        assert!(rules().login("not a device", Some("not a device")).is_err());
    }

    #[test]
    fn a_device_publishes_only_its_readings_and_answers_and_reads_only_its_commands() {
        let r = rules();
        let pi = id("pi");
        let allow = |perm, key| r.topic(&pi, "/", "sensorhub.mqtt", perm, key);
        assert_eq!(allow("write", "devices.pi.readings"), Decision::Allow);
        assert_eq!(allow("read", "devices.pi.commands"), Decision::Allow);
        assert_eq!(
            allow("write", "devices.pi.commands.0193-ab.result"),
            Decision::Allow
        );
        for (perm, key) in [
            ("write", "devices.other.commands.c1.result"),
            ("write", "devices.pi.commands..result"),
            ("write", "devices.pi.commands.x.y.result"),
            ("write", "devices.pi.commands.c1"),
            ("read", "devices.pi.commands.c1.result"),
            ("write", "devices.other.readings"),
            // would be read as device `pi.kitchen`'s
            ("write", "devices.pi.kitchen.readings"),
            ("write", "devices.pi.commands"),
            ("write", "sensor.data"),
            ("read", "devices.other.commands"),
            ("read", "devices.*.commands"),
            ("read", "devices.#"),
            ("read", "devices.pi.readings"),
        ] {
            assert_eq!(allow(perm, key), Decision::Deny, "{perm} {key}");
        }
        assert_eq!(
            r.topic(&pi, "/", "amq.topic", "write", "devices.pi.readings"),
            Decision::Deny
        );
        assert_eq!(
            r.topic(
                &pi,
                "other",
                "sensorhub.mqtt",
                "write",
                "devices.pi.readings"
            ),
            Decision::Deny
        );
    }

    #[test]
    fn a_device_touches_only_the_mqtt_exchange_and_its_own_queues() {
        let r = rules();
        let pi = id("pi");
        let q = |kind, name, perm| r.resource(&pi, "/", kind, name, perm);
        assert_eq!(q("exchange", "sensorhub.mqtt", "write"), Decision::Allow);
        assert_eq!(q("exchange", "sensorhub.mqtt", "read"), Decision::Allow);
        assert_eq!(
            q("queue", "mqtt-subscription-piqos1", "configure"),
            Decision::Allow
        );
        for (kind, name, perm) in [
            ("exchange", "sensorhub.mqtt", "configure"),
            ("exchange", "sensorhub.readings", "write"),
            ("exchange", "amq.topic", "write"),
            ("queue", "mqtt-subscription-otherqos1", "read"),
            ("queue", "sensorhub.mqtt.readings", "read"),
            ("queue", "sensorhub.readings", "read"),
        ] {
            assert_eq!(q(kind, name, perm), Decision::Deny, "{kind} {name} {perm}");
        }
        assert_eq!(r.vhost("/"), Decision::Allow);
        assert_eq!(r.vhost("other"), Decision::Deny);
    }
}
