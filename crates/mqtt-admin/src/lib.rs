//! Mosquitto's dynamic security plugin, administered over MQTT (`$CONTROL/dynamic-security/v1`), so
//! `sensorctl` and query-api's admin routes can add and remove device accounts on a broker they
//! cannot touch the files of, and a removal takes effect at once (Mosquitto disconnects the client).
//!
//! Accounts, each bound to one client id (the plugin refuses a CONNECT whose client id is not the
//! account's, and does so before it would take over the session of a client already connected):
//! - one per device, user name and client id its device id, password its token (one credential for
//!   HTTP and MQTT); its role `device-<id>` lets it publish only under `devices/<id>/` (its
//!   readings, its answers) and subscribe to and receive only `devices/<id>/commands/#`;
//! - one per ingest-mqtt replica, user name and client id `ingest-mqtt:<n>` (a `:` no device id
//!   may contain, so no device account can ever be bound to an ingest session); role
//!   `sensorhub-ingest`: subscribe to and receive every device's readings, every device's answers
//!   to its commands (`devices/<id>/commands/<command id>/result`) and the seed's topic, and
//!   publish every device's commands (`devices/<id>/commands`).
//!
//! Anything not granted is denied, receiving included ([`Broker::init`] sets the plugin's default
//! ACL access), so a subscription or session an account should not have delivers nothing.

mod endpoint;

pub use endpoint::{MqttEndpoint, parse_mqtt_url};

use std::time::Duration;

use models::DeviceId;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
const TIMEOUT: Duration = Duration::from_secs(10);
/// Commands per control message: the answers to a batch of `getClient` must stay well under the
/// broker's and our packet size limits.
const BATCH: usize = 100;

/// The role every ingest-mqtt account has. Also the user name of the single, unbound ingest
/// account of earlier versions, which [`Broker::init`] removes.
pub const INGEST_ROLE: &str = "sensorhub-ingest";
const LEGACY_INGEST_USER: &str = "sensorhub-ingest";
/// Most ingest-mqtt accounts `init` makes; more replicas than this would be a typo.
pub const MAX_INGEST_REPLICAS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum MqttAdminError {
    #[error("the MQTT admin URL needs credentials (mqtt://admin:password@host:port)")]
    NoCredentials,
    #[error("the MQTT admin URL: {0}")]
    BadUrl(String),
    #[error("cannot reach Mosquitto's dynamic security plugin: {0}")]
    Connection(String),
    #[error(
        "no answer from the dynamic security plugin within {TIMEOUT:?} (is it loaded? is this user its admin?)"
    )]
    Timeout,
    #[error("Mosquitto refused `{command}`: {error}")]
    Refused { command: String, error: String },
    #[error("Mosquitto has an account {0:?} that is not a device's: it is left alone")]
    NotADeviceAccount(String),
    #[error("ingest-mqtt replicas must be 1 to {MAX_INGEST_REPLICAS}, not {0}")]
    IngestReplicas(u32),
}

impl MqttAdminError {
    /// The broker could not be asked (down, unreachable, not answering): worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Connection(_) | Self::Timeout)
    }
}

/// ingest-mqtt replica `n`'s user name and client id, `ingest-mqtt:<n>`.
pub fn ingest_client_id(replica: u32) -> String {
    format!("ingest-mqtt:{replica}")
}

/// What [`Broker::init`] sets up for ingest-mqtt.
pub struct IngestAccounts<'a> {
    pub password: &'a str,
    /// Accounts `ingest-mqtt:1` to `ingest-mqtt:<replicas>`.
    pub replicas: u32,
    /// The seed's flat-format topic, when ingest-mqtt reads it.
    pub legacy_topic: Option<&'a str>,
}

/// What [`Broker::init`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InitReport {
    pub ingest_accounts: Vec<String>,
    /// Device accounts that were not bound to their client id yet and now are.
    pub devices_bound: usize,
    /// Whether the single ingest account of earlier versions was found and removed.
    pub legacy_ingest_removed: bool,
}

/// The dynamic security plugin, reached with its admin account.
#[derive(Clone, Debug)]
pub struct Broker {
    admin: MqttEndpoint,
}

impl Broker {
    /// `mqtt://admin:password@host[:port]`.
    pub fn from_url(url: &str) -> Result<Self, MqttAdminError> {
        let admin = parse_mqtt_url(url).map_err(MqttAdminError::BadUrl)?;
        Self::new(admin)
    }

    pub fn new(admin: MqttEndpoint) -> Result<Self, MqttAdminError> {
        if admin.credentials.is_none() {
            return Err(MqttAdminError::NoCredentials);
        }
        Ok(Self { admin })
    }

    /// Gives a registered device its account (replacing any earlier one of that device, so the
    /// password is its newest token), bound to its id as client id. Refuses, changing nothing,
    /// when an account of that name exists and is not a device's (the plugin's admin, say).
    pub async fn add_device(
        &self,
        device: &DeviceId,
        password: &str,
        legacy_topic: Option<&str>,
    ) -> Result<(), MqttAdminError> {
        let id = device.as_str();
        if let Some(roles) = self.account_roles(id).await?
            && !is_device_account(id, &roles)
        {
            return Err(MqttAdminError::NotADeviceAccount(id.to_owned()));
        }
        let mut commands = delete_device_account(id);
        commands.extend(device_account(id, password, legacy_topic));
        self.run(commands, &["not found"]).await?;
        Ok(())
    }

    /// Removes a device's account, disconnecting it now. `Ok(false)`: there was no device account
    /// of that name (an account of that name that is not a device's is left alone).
    pub async fn remove_device(&self, device: &DeviceId) -> Result<bool, MqttAdminError> {
        let id = device.as_str();
        match self.account_roles(id).await? {
            Some(roles) if is_device_account(id, &roles) => {
                self.run(delete_device_account(id), &["not found"]).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// What `sensorctl mqtt init` does, safe to run again: deny by default (nothing is sent,
    /// received or subscribed unless a role allows it), one account per ingest-mqtt replica, each
    /// bound to its client id; the single unbound ingest account of earlier versions removed; and
    /// the accounts of `devices` made before accounts were bound to client ids, bound to theirs.
    pub async fn init(
        &self,
        ingest: &IngestAccounts<'_>,
        devices: &[DeviceId],
    ) -> Result<InitReport, MqttAdminError> {
        if !(1..=MAX_INGEST_REPLICAS).contains(&ingest.replicas) {
            return Err(MqttAdminError::IngestReplicas(ingest.replicas));
        }
        let mut commands = vec![deny_by_default()];
        commands.extend(ingest_role(ingest.legacy_topic));
        let mut report = InitReport::default();
        for replica in 1..=ingest.replicas {
            let name = ingest_client_id(replica);
            commands.extend(ingest_account(&name, ingest.password));
            report.ingest_accounts.push(name);
        }
        self.run(commands, &["already exists"]).await?;

        if let Some(roles) = self.account_roles(LEGACY_INGEST_USER).await?
            && roles == [INGEST_ROLE]
        {
            self.run(
                vec![json!({"command": "deleteClient", "username": LEGACY_INGEST_USER})],
                &["not found"],
            )
            .await?;
            report.legacy_ingest_removed = true;
        }

        for chunk in devices.chunks(BATCH) {
            let lookups = chunk
                .iter()
                .map(|d| json!({"command": "getClient", "username": d.as_str()}))
                .collect();
            let answers = self.run(lookups, &["not found"]).await?;
            let unbound: Vec<Value> = chunk
                .iter()
                .zip(&answers)
                .filter(|(device, answer)| {
                    let client = &answer["data"]["client"];
                    is_device_account(device.as_str(), &roles_of(client))
                        && client["clientid"].as_str() != Some(device.as_str())
                })
                .map(|(device, _)| {
                    json!({"command": "modifyClient", "username": device.as_str(),
                           "clientid": device.as_str()})
                })
                .collect();
            if !unbound.is_empty() {
                report.devices_bound += unbound.len();
                self.run(unbound, &[]).await?;
            }
        }
        Ok(report)
    }

    /// The roles of account `username`, `None` when there is no such account.
    async fn account_roles(&self, username: &str) -> Result<Option<Vec<String>>, MqttAdminError> {
        let answers = self
            .run(
                vec![json!({"command": "getClient", "username": username})],
                &["not found"],
            )
            .await?;
        let client = answers.first().map(|a| &a["data"]["client"]);
        Ok(client.filter(|c| c.is_object()).map(roles_of))
    }

    /// Runs `commands` as the plugin's admin and returns the answer to each, in order.
    pub async fn run(
        &self,
        commands: Vec<Value>,
        tolerated: &[&str],
    ) -> Result<Vec<Value>, MqttAdminError> {
        execute(&self.admin, commands, tolerated).await
    }
}

/// A device account is one whose only role is `device-<its id>`.
fn is_device_account(device_id: &str, roles: &[String]) -> bool {
    roles == [device_role(device_id)]
}

fn roles_of(client: &Value) -> Vec<String> {
    client["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["rolename"].as_str().map(str::to_owned))
        .collect()
}

/// Nothing is allowed that a role does not allow; only unsubscribing stays open (harmless, and
/// clients expect it to work).
fn deny_by_default() -> Value {
    json!({"command": "setDefaultACLAccess", "acls": [
        {"acltype": "publishClientSend", "allow": false},
        {"acltype": "publishClientReceive", "allow": false},
        {"acltype": "subscribe", "allow": false},
        {"acltype": "unsubscribe", "allow": true},
    ]})
}

/// The role of every ingest-mqtt account: read devices' readings and their answers to commands
/// (plain or shared subscriptions) and, when enabled, the seed's topic; send devices their
/// commands. Existing ACLs answer "already exists", so on a broker set up by an earlier version the
/// role is kept and the ACLs it lacks are added.
fn ingest_role(legacy_topic: Option<&str>) -> Vec<Value> {
    let mut topics = vec!["devices/+/readings", "devices/+/commands/+/result"];
    topics.extend(legacy_topic);
    let mut acls = Vec::new();
    for topic in topics {
        // the plugin checks a shared subscription's whole filter, $share/<group>/ included
        for filter in [topic.to_owned(), format!("$share/+/{topic}")] {
            acls.push(json!({"acltype": "subscribePattern", "topic": filter, "allow": true}));
        }
        acls.push(json!({"acltype": "publishClientReceive", "topic": topic, "allow": true}));
    }
    acls.push(
        json!({"acltype": "publishClientSend", "topic": "devices/+/commands", "allow": true}),
    );
    let mut commands = vec![json!({"command": "createRole", "rolename": INGEST_ROLE})];
    commands.extend(acls.into_iter().map(|acl| {
        let mut command = acl;
        command["command"] = json!("addRoleACL");
        command["rolename"] = json!(INGEST_ROLE);
        command
    }));
    commands
}

/// One ingest-mqtt replica's account: created, or brought to this password, role and client id.
fn ingest_account(name: &str, password: &str) -> Vec<Value> {
    vec![
        json!({"command": "createClient", "username": name, "clientid": name,
               "password": password, "roles": [{"rolename": INGEST_ROLE}]}),
        json!({"command": "modifyClient", "username": name, "clientid": name,
               "password": password, "roles": [{"rolename": INGEST_ROLE}]}),
    ]
}

fn device_role(device_id: &str) -> String {
    format!("device-{device_id}")
}

/// A device's account: publish under `devices/<id>/`, read only `devices/<id>/commands`; its
/// client id must be its device id. `legacy_topic`: also publish the seed's topic (off unless the
/// operator enables it).
fn device_account(device_id: &str, password: &str, legacy_topic: Option<&str>) -> Vec<Value> {
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
        json!({"command": "createClient", "username": device_id, "clientid": device_id,
               "password": password, "roles": [{"rolename": device_role(device_id)}]}),
    ]
}

/// Deletes a device's account (disconnecting it now) and its role.
fn delete_device_account(device_id: &str) -> Vec<Value> {
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
) -> Result<Vec<Value>, MqttAdminError> {
    let (user, password) = admin
        .credentials
        .clone()
        .ok_or(MqttAdminError::NoCredentials)?;
    // the admin account is not bound to a client id; a fresh one per call never meets a
    // device's session (`:` is in no device id)
    let mut options = MqttOptions::new(
        format!("sensorhub-admin:{}", uuid::Uuid::new_v4().simple()),
        admin.host.clone(),
        admin.port,
    );
    options
        .set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(1 << 20, 1 << 20);
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
                    return check(answer, tolerated);
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

fn check(answer: Value, tolerated: &[&str]) -> Result<Vec<Value>, MqttAdminError> {
    let responses = match answer {
        Value::Object(mut map) => match map.remove("responses") {
            Some(Value::Array(responses)) => responses,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    for response in &responses {
        if let Some(error) = response["error"].as_str()
            && !tolerated.iter().any(|t| error.contains(t))
        {
            return Err(MqttAdminError::Refused {
                command: response["command"].as_str().unwrap_or("?").to_owned(),
                error: error.to_owned(),
            });
        }
    }
    Ok(responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_other_than_the_tolerated_ones_are_reported() {
        let answer = json!({"responses": [{"command": "createRole", "error": "Role already exists"},
                                          {"command": "createClient"}]});
        assert_eq!(check(answer.clone(), &["already exists"]).unwrap().len(), 2);
        let err = check(answer, &[]).unwrap_err();
        assert!(err.to_string().contains("createRole"), "{err}");
    }

    #[test]
    fn a_device_may_publish_under_its_own_prefix_only_with_its_own_client_id() {
        let commands = device_account("raspi-01", "pw", None);
        let acls = commands[0]["acls"].as_array().unwrap();
        assert!(acls.iter().all(|a| {
            a["topic"]
                .as_str()
                .unwrap()
                .starts_with("devices/raspi-01/")
        }));
        assert_eq!(commands[1]["username"], "raspi-01");
        assert_eq!(commands[1]["clientid"], "raspi-01");
    }

    #[test]
    fn ingest_reads_answers_and_sends_commands_and_an_existing_role_gets_the_new_acls() {
        let commands = ingest_role(None);
        assert_eq!(commands[0]["command"], "createRole");
        assert!(
            commands[0].get("acls").is_none(),
            "ACLs are added one by one"
        );
        let acls: Vec<(String, String)> = commands[1..]
            .iter()
            .map(|c| {
                assert_eq!(c["command"], "addRoleACL");
                assert_eq!(c["allow"], true);
                (
                    c["acltype"].as_str().unwrap().to_owned(),
                    c["topic"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for expected in [
            ("subscribePattern", "devices/+/commands/+/result"),
            ("subscribePattern", "$share/+/devices/+/commands/+/result"),
            ("publishClientReceive", "devices/+/commands/+/result"),
            ("publishClientSend", "devices/+/commands"),
        ] {
            assert!(
                acls.contains(&(expected.0.to_owned(), expected.1.to_owned())),
                "{expected:?} in {acls:?}"
            );
        }
        assert_eq!(
            acls.iter()
                .filter(|(t, _)| t == "publishClientSend")
                .count(),
            1,
            "ingest sends nothing but commands"
        );
    }

    #[test]
    fn no_device_id_can_be_an_ingest_client_id() {
        for replica in [1, 2, MAX_INGEST_REPLICAS] {
            assert!(DeviceId::parse(ingest_client_id(replica).as_str()).is_err());
        }
    }

    #[test]
    fn only_an_account_with_its_device_role_alone_is_a_device_account() {
        assert!(is_device_account("raspi-01", &["device-raspi-01".into()]));
        assert!(!is_device_account("admin", &["admin".into()]));
        assert!(!is_device_account(
            "raspi-01",
            &["device-raspi-01".into(), "admin".into()]
        ));
    }
}
