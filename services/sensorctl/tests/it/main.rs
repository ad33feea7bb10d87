//! sensorctl driven as an operator drives it: the real binary, a real PostgreSQL and a real
//! Mosquitto with the production configuration.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first thing that is not as it must be"
)]

use std::process::{Command, Output};
use std::time::Duration;

use auth::{Role, TokenVerifier};
use testkit::TestDb;
use testkit::mqtt::{Device, Mosquitto};

struct Operator {
    db: TestDb,
    keys_dir: std::path::PathBuf,
    mqtt_admin: Option<String>,
}

impl Operator {
    fn new() -> Self {
        Self::on(TestDb::migrated())
    }

    fn on(db: TestDb) -> Self {
        Self {
            db,
            keys_dir: std::env::temp_dir().join(testkit::unique_name("sensorctl-keys")),
            mqtt_admin: None,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorctl"));
        cmd.args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("SENSORHUB_KEYS_DIR", &self.keys_dir)
            .env_remove("SENSORHUB_MQTT_ADMIN_URL");
        if let Some(admin) = &self.mqtt_admin {
            cmd.env("SENSORHUB_MQTT_ADMIN_URL", admin);
        }
        cmd.output().expect("run sensorctl")
    }

    /// Standard output of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "sensorctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "sensorctl {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn verifier(&self) -> TokenVerifier {
        TokenVerifier::from_file(&self.keys_dir.join(auth::VERIFYING_KEY_FILE)).unwrap()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.keys_dir);
    }
}

/// Whether the broker grants `device` a subscription to every device's readings (no answer within
/// 300 ms is a no).
async fn reads_readings(device: &Device) -> bool {
    device
        .listen("devices/+/readings", Duration::from_millis(300))
        .subscribed()
        .await
}

#[test]
fn migrate_is_safe_to_run_again() {
    let op = Operator::on(TestDb::unmigrated());
    assert!(op.ok(&["migrate"]).contains("applied"));
    assert_eq!(op.ok(&["migrate"]), "");
    op.ok(&["pending"]);
}

#[test]
fn conflicts_are_listed_newest_first_and_by_device() {
    let op = Operator::new();
    let mut conn = op.db.connect();
    testkit::execute(
        &mut conn,
        "INSERT INTO reading_conflicts
             (device_id, reading_id, variant, ts, ts_assigned, metrics, stored_ts, reason, received_at)
         VALUES ('raspi-01', 'r-1', 'a', '2026-11-25T10:01:00Z', true, '{\"t\": 21}',
                 '2026-11-25T10:00:00Z', 'the same id was stored with other metrics', now()),
                ('raspi-02', 'r-9', 'b', '2026-11-25T10:00:01Z', false, '{\"t\": 5}',
                 '2026-11-25T10:00:00Z', 'the same id was stored with another time',
                 now() - interval '1 hour')",
    );
    let all = op.ok(&["conflicts", "list"]);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 3, "{all}");
    assert!(
        lines[1].contains("raspi-01") && lines[1].contains("other metrics"),
        "{all}"
    );
    assert!(
        lines[1].contains("(none: server time)") && lines[1].contains(r#"{"t":21}"#),
        "{all}"
    );
    assert!(
        lines[2].contains("raspi-02") && lines[2].contains("2026-11-25T10:00:01.000000Z"),
        "{all}"
    );
    let one = op.ok(&["conflicts", "list", "--device", "raspi-02"]);
    assert_eq!(one.lines().count(), 2, "{one}");
    assert!(!one.contains("raspi-01"), "{one}");
}

#[test]
fn rollups_are_verified_against_raw_readings_and_rebuilt_from_them() {
    let op = Operator::new();
    let mut conn = op.db.connect();
    // readings written by hand, around the persister: no summary holds them yet
    testkit::execute(
        &mut conn,
        "SELECT sensorhub_ensure_readings_partition(now());
         INSERT INTO readings (device_id, ts, reading_id, metrics)
         VALUES ('raspi-01', now() - interval '2 minutes', 'a', '{\"t\": 0.1}'),
                ('raspi-01', now() - interval '1 minute', 'b', '{\"t\": 0.2, \"h\": 50}'),
                ('raspi-02', now(), 'c', '{\"t\": 7}')",
    );
    let differences = op.fails(&["rollups", "verify"]);
    assert!(
        differences.contains("differ from the raw readings"),
        "{differences}"
    );
    let listed = String::from_utf8(op.run(&["rollups", "verify"]).stdout).unwrap();
    assert!(
        listed.contains("rollups_1m raspi-01 t") && listed.contains("summary [none]"),
        "{listed}"
    );

    let one = op.ok(&["rollups", "rebuild", "--device", "raspi-01"]);
    assert!(one.contains("rebuilt"), "{one}");
    let still = String::from_utf8(op.run(&["rollups", "verify"]).stdout).unwrap();
    assert!(
        !still.contains("raspi-01") && still.contains("raspi-02"),
        "{still}"
    );
    op.ok(&["rollups", "rebuild", "--from", "2026-01-01"]);
    assert!(
        op.ok(&["rollups", "verify"])
            .contains("every summary equals")
    );
    assert!(op.ok(&["rollups", "status"]).contains("no deltas wait"));

    let bad = op.fails(&["rollups", "rebuild", "--from", "yesterday"]);
    assert!(bad.contains("neither a date"), "{bad}");
    let bad = op.fails(&["rollups", "rebuild", "--device", "no spaces"]);
    assert!(bad.contains("--device"), "{bad}");
}

#[test]
fn keys_devices_and_tokens_from_the_command_line() {
    let op = Operator::new();
    op.ok(&["keys", "init"]);
    assert!(
        op.fails(&["keys", "init"]).contains("--force"),
        "an existing key pair is kept"
    );

    let token = op.ok(&["device", "add", "raspi-01"]);
    let claims = op.verifier().verify(token.trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("raspi-01", Role::Device)
    );
    assert!(
        op.fails(&["device", "add", "raspi-01"])
            .contains("already registered")
    );
    assert!(op.fails(&["device", "add", "bad id"]).contains("device id"));

    let listed = op.ok(&["device", "list"]);
    assert!(
        listed.contains("raspi-01") && listed.contains("active") && listed.contains(&claims.jti),
        "{listed}"
    );
    op.ok(&["device", "revoke", "raspi-01"]);
    assert!(op.ok(&["device", "list"]).contains("revoked"));
    assert!(
        op.fails(&["device", "revoke", "raspi-01"])
            .contains("not an active")
    );
    // registered again: a new token, the old one stays revoked
    let again = op.ok(&["device", "add", "raspi-01"]);
    assert_ne!(op.verifier().verify(again.trim()).unwrap().jti, claims.jti);

    let reader = op.ok(&[
        "token",
        "issue",
        "--role",
        "reader",
        "--ttl",
        "30d",
        "--name",
        "dashboard",
    ]);
    let claims = op.verifier().verify(reader.trim()).unwrap();
    assert_eq!(
        (claims.role, claims.sub.as_str()),
        (Role::Reader, "dashboard")
    );
    let ttl = claims.exp.unwrap() - claims.iat;
    assert_eq!(ttl, 30 * 86_400);
    let operator = op.ok(&["token", "issue", "--role", "operator", "--name", "ops"]);
    assert_eq!(
        op.verifier().verify(operator.trim()).unwrap().role,
        Role::Operator
    );
    assert!(
        op.fails(&["token", "issue", "--role", "device"])
            .contains("reader, operator or admin")
    );
    assert!(
        op.fails(&["token", "issue", "--role", "reader", "--ttl", "forever"])
            .contains("--ttl")
    );
}

#[test]
fn app_tokens_are_recorded_listed_and_revoked_and_their_ttl_is_capped() {
    let op = Operator::new();
    op.ok(&["keys", "init"]);
    let issue = |extra: &[&str]| {
        let mut args = vec!["token", "issue", "--role", "admin", "--name", "ops"];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let args = issue(&["--ttl", "365d"]);
    let token = op.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let claims = op.verifier().verify(token.trim()).unwrap();
    let mut conn = store::connect(&op.db.url).unwrap();
    let recorded = store::app_tokens::list_app_tokens(&mut conn, None, 10).unwrap();
    assert_eq!(recorded.len(), 1, "recorded when issued");
    assert_eq!(
        (
            recorded[0].id.as_str(),
            recorded[0].name.as_str(),
            recorded[0].role.as_str()
        ),
        (claims.jti.as_str(), "ops", "admin")
    );
    assert_eq!(
        recorded[0].expires_at.timestamp() - recorded[0].issued_at.timestamp(),
        365 * 86_400
    );

    // over the cap (365 days by default, or as configured): refused, nothing recorded
    let args = issue(&["--ttl", "366d"]);
    let refused = op.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        refused.contains("longer than the 31536000s allowed"),
        "{refused}"
    );
    let args = issue(&["--ttl", "2h", "--max-ttl-secs", "3600"]);
    assert!(
        op.fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .contains("longer than the 3600s allowed")
    );
    assert_eq!(
        store::app_tokens::list_app_tokens(&mut conn, None, 10)
            .unwrap()
            .len(),
        1
    );

    let listed = op.ok(&["token", "list"]);
    let line = listed.lines().find(|l| l.starts_with(&claims.jti)).unwrap();
    assert!(
        line.contains("ops") && line.contains("admin") && line.contains("active"),
        "{listed}"
    );
    op.ok(&["token", "revoke", &claims.jti]);
    assert!(
        op.ok(&["token", "list"])
            .lines()
            .any(|l| l.starts_with(&claims.jti) && l.contains("revoked"))
    );
    assert!(
        op.fails(&["token", "revoke", &claims.jti])
            .contains("not an active app token")
    );
    assert!(
        op.fails(&["token", "revoke", "no-such-token"])
            .contains("not an active app token")
    );
}

#[tokio::test]
async fn devices_get_and_lose_their_mqtt_accounts() {
    let mosquitto = Mosquitto::production();
    let mut op = Operator::new();
    op.mqtt_admin = Some(mosquitto.admin_url());
    let op = op;
    let blocking = |args: Vec<&'static str>| {
        let out = op.run(&args);
        assert!(
            out.status.success(),
            "sensorctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    blocking(vec!["keys", "init"]);
    let init = vec![
        "mqtt",
        "init",
        "--ingest-password",
        "ingest-pw",
        "--ingest-replicas",
        "2",
    ];
    blocking(init.clone());
    blocking(init); // again: harmless
    let token = blocking(vec!["device", "add", "raspi-01"]);
    let token = token.trim();
    let topic = || {
        vec![(
            "devices/raspi-01/readings".to_owned(),
            br#"{"metrics":{"t":1}}"#.to_vec(),
        )]
    };
    let wait = Duration::from_secs(3);
    let pi = Device::new("raspi-01", mosquitto.port).with_credentials("raspi-01", token);
    assert_eq!(
        pi.publish_all(topic(), Duration::ZERO, wait).await,
        1,
        "the token is the MQTT password"
    );
    let elsewhere = Device::new("pi", mosquitto.port).with_credentials("raspi-01", token);
    assert_eq!(
        elsewhere.publish_all(topic(), Duration::ZERO, wait).await,
        0,
        "the device id is the only client id it may use"
    );
    for replica in ["ingest-mqtt:1", "ingest-mqtt:2"] {
        let ingest = Device::new(replica, mosquitto.port).with_credentials(replica, "ingest-pw");
        assert!(
            reads_readings(&ingest).await,
            "{replica} may read the readings"
        );
    }
    let ingest =
        Device::new("ingest-mqtt:3", mosquitto.port).with_credentials("ingest-mqtt:3", "ingest-pw");
    assert!(
        !reads_readings(&ingest).await,
        "only the replicas asked for have accounts"
    );
    blocking(vec!["device", "revoke", "raspi-01"]);
    let pi = Device::new("raspi-01", mosquitto.port).with_credentials("raspi-01", token);
    assert_eq!(
        pi.publish_all(topic(), Duration::ZERO, wait).await,
        0,
        "revoked: refused"
    );
}

#[tokio::test]
async fn accounts_that_are_not_devices_are_never_touched_by_device_commands() {
    let mosquitto = Mosquitto::production();
    let mut op = Operator::new();
    op.mqtt_admin = Some(mosquitto.admin_url());
    op.ok(&["keys", "init"]);
    // the plugin's admin is "admin", a name a device could have
    let refused = op.fails(&["device", "add", "admin"]);
    assert!(refused.contains("not a device's"), "{refused}");
    assert!(
        op.ok(&["device", "list"]).contains("revoked"),
        "the registration was undone"
    );
    assert!(
        op.fails(&["device", "revoke", "admin"])
            .contains("not an active")
    );
    // the admin account still works
    op.ok(&["device", "add", "raspi-01"]);
}

#[tokio::test]
async fn mqtt_init_brings_the_accounts_of_earlier_versions_in_line() {
    let mosquitto = Mosquitto::production();
    let mut op = Operator::new();
    op.ok(&["keys", "init"]);
    let token = op.ok(&["device", "add", "raspi-01"]);
    let token = token.trim();
    // as earlier versions made them: bound to no client id, receiving allowed by default
    let broker = mqtt_admin::Broker::from_url(&mosquitto.admin_url()).unwrap();
    let device_acl = serde_json::json!([{"acltype": "publishClientSend",
                                         "topic": "devices/raspi-01/#", "allow": true}]);
    broker
        .run(
            vec![
                serde_json::json!({"command": "createRole", "rolename": "device-raspi-01",
                                   "acls": device_acl}),
                serde_json::json!({"command": "createClient", "username": "raspi-01",
                                   "password": token, "roles": [{"rolename": "device-raspi-01"}]}),
                serde_json::json!({"command": "createRole", "rolename": "sensorhub-ingest"}),
                serde_json::json!({"command": "createClient", "username": "sensorhub-ingest",
                                   "password": "old-pw", "roles": [{"rolename": "sensorhub-ingest"}]}),
            ],
            &[],
        )
        .await
        .unwrap();
    let reading = || {
        vec![(
            "devices/raspi-01/readings".to_owned(),
            br#"{"metrics":{"t":1}}"#.to_vec(),
        )]
    };
    let wait = Duration::from_secs(3);
    let as_other =
        || Device::new("not-raspi-01", mosquitto.port).with_credentials("raspi-01", token);
    assert_eq!(
        as_other()
            .publish_all(reading(), Duration::ZERO, wait)
            .await,
        1,
        "before: any client id"
    );

    op.mqtt_admin = Some(mosquitto.admin_url());
    let out = op.run(&["mqtt", "init", "--ingest-password", "new-pw"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("bound 1 device"), "{said}");
    assert!(said.contains("removed the old shared account"), "{said}");

    assert_eq!(
        as_other()
            .publish_all(reading(), Duration::ZERO, wait)
            .await,
        0,
        "after: its device id only"
    );
    let own = Device::new("raspi-01", mosquitto.port).with_credentials("raspi-01", token);
    assert_eq!(own.publish_all(reading(), Duration::ZERO, wait).await, 1);
    let old_ingest = Device::new("sensorhub-ingest", mosquitto.port)
        .with_credentials("sensorhub-ingest", "old-pw");
    assert!(
        !reads_readings(&old_ingest).await,
        "the old shared ingest account is gone (its role, which init extends, would allow this)"
    );
}

#[test]
fn retention_is_set_shown_and_applied_from_the_command_line() {
    let op = Operator::new();
    let mut conn = op.db.connect();
    testkit::execute(
        &mut conn,
        "INSERT INTO readings (device_id, ts, reading_id, metrics) VALUES
             ('raspi-01', now() - interval '10 days', 'old', '{\"t\": 1}'),
             ('raspi-01', now() - interval '1 day', 'new', '{\"t\": 2}'),
             ('raspi-02', now() - interval '10 days', 'old', '{\"t\": 3}');
         INSERT INTO rollups_1h (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
         VALUES ('raspi-01', 't', date_trunc('hour', now()) - interval '3 days', 1, 1, 1, 1, now(), now())",
    );
    op.ok(&["retention", "set", "raw", "7d"]);
    op.ok(&["retention", "set", "raw", "30d", "--device", "raspi-02"]);
    op.ok(&["retention", "set", "1h", "48h", "--metric", "t"]);
    let shown = op.ok(&["retention", "show"]);
    let line = |needle: &str| {
        shown
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {shown}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(line("global")[..3], ["raw", "global", "7d"], "{shown}");
    assert_eq!(
        line("device=raspi-02")[..3],
        ["raw", "device=raspi-02", "30d"]
    );
    assert_eq!(line("metric=t")[..3], ["1h", "metric=t", "2d"]);
    assert_eq!(line("1d ")[..3], ["1d", "global", "forever"]);

    let applied = op.ok(&["retention", "apply"]);
    assert!(
        applied.contains("deleted 1 row(s) of raw (global)"),
        "{applied}"
    );
    assert!(
        applied.contains("deleted 1 row(s) of 1h (metric=t)"),
        "{applied}"
    );
    assert!(
        applied.contains("rows raw 1, 1m 0, 1h 1, 1d 0"),
        "{applied}"
    );
    assert_eq!(testkit::count_rows(&op.db.url, "readings"), 2);
    let again = op.ok(&["retention", "apply"]);
    assert!(
        again.contains("0 partition(s); rows raw 0, 1m 0, 1h 0, 1d 0"),
        "{again}"
    );

    // what the policy cannot hold is refused, and changes nothing
    assert!(
        op.fails(&["retention", "set", "raw", "7d", "--metric", "t"])
            .contains("per metric")
    );
    assert!(
        op.fails(&["retention", "set", "raw", "7x"])
            .contains("keep")
    );
    assert!(
        op.fails(&["retention", "set", "2h", "7d"])
            .contains("table")
    );
    assert!(
        op.fails(&["retention", "set", "1h", "7d", "--device", "no spaces"])
            .contains("device")
    );
    assert!(
        op.fails(&["retention", "unset", "raw"])
            .contains("cannot be removed")
    );
    op.ok(&["retention", "unset", "raw", "--device", "raspi-02"]);
    assert!(
        op.fails(&["retention", "unset", "raw", "--device", "raspi-02"])
            .contains("no override")
    );
    let shown = op.ok(&["retention", "show"]);
    assert_eq!(shown.lines().count(), 1 + 4 + 1, "{shown}");
}
