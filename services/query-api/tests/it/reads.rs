//! `database_read_url`: the read-only API reads there (in production a standby), everything else
//! stays on `database_url`, and `/readyz` says where reads go.

use super::*;

fn device_ids(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn reads_go_to_the_read_url_and_readyz_says_so() {
    // a second database stands in for the standby: what only it holds shows where reads go
    let replica = TestDb::migrated();
    store::write_readings(
        &mut replica.connect(),
        &[reading("on-replica", "x", t0(), &[("v", 1.0)])],
        &mut Default::default(),
    )
    .unwrap();
    let read_url = replica.url.clone();
    let api = api_with_data_and(|s| s.database_read_url = read_url).await;

    assert_eq!(device_ids(&api.ok("/v1/devices").await), ["on-replica"]);
    assert_eq!(
        api.ok("/v1/devices/on-replica/latest").await["metrics"]["v"]["value"],
        1.0
    );
    let (status, _) = api.get("/v1/devices/pi-1/readings").await;
    assert_eq!(status, 404, "pi-1 is only on the primary");

    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["postgres_reads"], "up", "{ready}");
    let reads = ready["details"]["postgres_reads"].as_str().unwrap();
    assert!(
        reads.starts_with("primary at ") && reads.ends_with("(database_read_url)"),
        "{reads}"
    );
    drop(replica);
}

#[tokio::test]
async fn without_a_read_url_reads_go_to_the_primary_and_readyz_says_so() {
    let api = api_with_data().await;
    assert!(device_ids(&api.ok("/v1/devices").await).contains(&"pi-1".to_owned()));
    let (status, ready) = api.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready["checks"].get("postgres_reads").is_none(), "{ready}");
    let reads = ready["details"]["postgres_reads"].as_str().unwrap();
    assert!(reads.contains("database_read_url is not set"), "{reads}");
}
