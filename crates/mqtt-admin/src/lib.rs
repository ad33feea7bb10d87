//! Mosquitto's dynamic security plugin, administered over MQTT (`$CONTROL/dynamic-security/v1`), so
//! `sensorctl` can add and remove device accounts on a broker it cannot touch the files of, and a
//! removal takes effect at once (Mosquitto disconnects the client).
//!
//! Accounts: `sensorhub-ingest` (role `sensorhub-ingest`: subscribe to every device's readings and
//! the seed's topic), and one per device, named by its device id, whose role `device-<id>` lets it
//! publish only under `devices/<id>/` and subscribe only to `devices/<id>/commands`. A device's
//! password is its token, so one credential serves HTTP and MQTT.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use service_kit::net::MqttEndpoint;

const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
const TIMEOUT: Duration = Duration::from_secs(10);

pub const INGEST_USER: &str = "sensorhub-ingest";

#[derive(Debug, thiserror::Error)]
pub enum MqttAdminError {
    #[error("the MQTT admin URL needs credentials (mqtt://admin:password@host:port)")]
    NoCredentials,
    #[error("cannot reach Mosquitto's dynamic security plugin: {0}")]
    Connection(String),
    #[error(
        "no answer from the dynamic security plugin within {TIMEOUT:?} (is it loaded? is this user its admin?)"
    )]
    Timeout,
    #[error("Mosquitto refused `{command}`: {error}")]
    Refused { command: String, error: String },
}

/// The role and account ingest-mqtt uses: read devices' readings (plain or shared subscriptions)
/// and, when enabled, the seed's topic.
pub fn ingest_account(password: &str, legacy_topic: Option<&str>) -> Vec<Value> {
    let mut topics = vec!["devices/+/readings"];
    topics.extend(legacy_topic);
    let mut acls = Vec::new();
    for topic in topics {
        // the plugin checks a shared subscription's whole filter, $share/<group>/ included
        for filter in [topic.to_owned(), format!("$share/+/{topic}")] {
            acls.push(json!({"acltype": "subscribePattern", "topic": filter, "allow": true}));
        }
        acls.push(json!({"acltype": "publishClientReceive", "topic": topic, "allow": true}));
    }
    vec![
        json!({"command": "createRole", "rolename": INGEST_USER, "acls": acls}),
        json!({"command": "createClient", "username": INGEST_USER, "password": password,
               "roles": [{"rolename": INGEST_USER}]}),
    ]
}

fn device_role(device_id: &str) -> String {
    format!("device-{device_id}")
}

/// A device's account: publish under `devices/<id>/`, read only `devices/<id>/commands`.
/// `legacy_topic`: also publish the seed's topic (off unless the operator enables it).
pub fn device_account(device_id: &str, password: &str, legacy_topic: Option<&str>) -> Vec<Value> {
    let mut acls = vec![
        json!({"acltype": "publishClientSend", "topic": format!("devices/{device_id}/#"), "allow": true}),
        json!({"acltype": "subscribePattern", "topic": format!("devices/{device_id}/commands/#"), "allow": true}),
        json!({"acltype": "publishClientReceive", "topic": format!("devices/{device_id}/commands/#"), "allow": true}),
    ];
    if let Some(topic) = legacy_topic {
        acls.push(json!({"acltype": "publishClientSend", "topic": topic, "allow": true}));
    }
    vec![
        json!({"command": "createRole", "rolename": device_role(device_id), "acls": acls}),
        json!({"command": "createClient", "username": device_id, "password": password,
               "roles": [{"rolename": device_role(device_id)}]}),
    ]
}

/// Removes a device's account (disconnecting it now) and its role.
pub fn remove_device(device_id: &str) -> Vec<Value> {
    vec![
        json!({"command": "deleteClient", "username": device_id}),
        json!({"command": "deleteRole", "rolename": device_role(device_id)}),
    ]
}

/// Runs `commands` as the plugin's admin and returns each one's answer; an answer with an error
/// is `Err` unless the error is in `tolerated` (e.g. "already exists" for idempotent set-ups).
pub async fn execute(
    admin: &MqttEndpoint,
    commands: Vec<Value>,
    tolerated: &[&str],
) -> Result<(), MqttAdminError> {
    let (user, password) = admin
        .credentials
        .clone()
        .ok_or(MqttAdminError::NoCredentials)?;
    let mut options = MqttOptions::new(
        format!("sensorctl-{}", uuid::Uuid::new_v4().simple()),
        admin.host.clone(),
        admin.port,
    );
    options
        .set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(options, 16);
    let run = async {
        client
            .subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
            .await
            .map_err(|e| MqttAdminError::Connection(e.to_string()))?;
        let mut sent = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) if !sent => {
                    sent = true;
                    let payload = json!({"commands": commands}).to_string();
                    client
                        .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload)
                        .await
                        .map_err(|e| MqttAdminError::Connection(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE_TOPIC => {
                    let answer: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    return check(&answer, tolerated);
                }
                Ok(_) => {}
                Err(e) => return Err(MqttAdminError::Connection(e.to_string())),
            }
        }
    };
    let result = tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or(Err(MqttAdminError::Timeout));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
    result
}

fn check(answer: &Value, tolerated: &[&str]) -> Result<(), MqttAdminError> {
    for response in answer["responses"].as_array().into_iter().flatten() {
        if let Some(error) = response["error"].as_str()
            && !tolerated.iter().any(|t| error.contains(t))
        {
            return Err(MqttAdminError::Refused {
                command: response["command"].as_str().unwrap_or("?").to_owned(),
                error: error.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_other_than_the_tolerated_ones_are_reported() {
        let answer = json!({"responses": [{"command": "createRole", "error": "Role already exists"},
                                          {"command": "createClient"}]});
        assert!(check(&answer, &["already exists"]).is_ok());
        let err = check(&answer, &[]).unwrap_err();
        assert!(err.to_string().contains("createRole"), "{err}");
    }

    #[test]
    fn a_device_may_publish_under_its_own_prefix_only() {
        let commands = device_account("raspi-01", "pw", None);
        let acls = commands[0]["acls"].as_array().unwrap();
        assert!(acls.iter().all(|a| {
            a["topic"]
                .as_str()
                .unwrap()
                .starts_with("devices/raspi-01/")
        }));
        assert_eq!(commands[1]["username"], "raspi-01");
    }
}
