//! The CSV form of a device's readings: `GET /v1/devices/{id}/readings` with `Accept: text/csv`
//! answers the whole asked range (`from`, `to`, `metric`; no paging), newest first as the JSON
//! pages, one row a reading: `ts,id,<metric>,<metric>...`, an empty cell where a reading lacks a
//! metric. It is streamed a page at a time from PostgreSQL (each page on a pooled connection
//! taken for it alone), so a year of a device's data never sits in memory, and a client that goes
//! away stops the reading.

use std::fmt::Write as _;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
use chrono::SecondsFormat;
use store::PgPool;
use store::read::{ReadingsQuery, StoredReading};
use tokio::sync::mpsc;

use crate::api::with_conn;
use crate::error::QueryError;

/// Readings per page read from PostgreSQL (and per chunk written to the client).
const ROWS_PER_PAGE: i64 = 5_000;
/// Pages read ahead of a slow client, at most.
const PAGES_AHEAD: usize = 2;

pub const CONTENT_TYPE: &str = "text/csv; charset=utf-8";

/// Whether the request asks for CSV (`Accept: text/csv`).
pub fn wanted(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/csv"))
        })
}

/// The readings `q` asks for (its `before` and `limit` are the stream's own), as a CSV download.
/// The columns: the metrics asked for, or every metric the device has sent; 404 for a device with
/// no readings.
pub async fn readings(pool: &PgPool, mut q: ReadingsQuery) -> Result<HttpResponse, QueryError> {
    let device = q.device_id.clone();
    let lookup = device.clone();
    let Some(summary) = with_conn(pool, move |conn| store::read::device(conn, &lookup)).await?
    else {
        return Err(QueryError::UnknownDevice(device));
    };
    let columns = if q.metrics.is_empty() {
        let mut all: Vec<String> = summary.metrics.into_iter().flatten().collect();
        all.sort();
        all.dedup();
        all
    } else {
        q.metrics.clone()
    };
    q.before = None;
    q.limit = ROWS_PER_PAGE;
    let (chunks, received) = mpsc::channel(PAGES_AHEAD);
    let pool = PgPool::clone(pool);
    tokio::task::spawn_blocking(move || stream_pages(&pool, q, &columns, &chunks));
    let body = futures_util::stream::unfold(received, |mut received| async move {
        received.recv().await.map(|chunk| (chunk, received))
    });
    Ok(HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{device}.csv\""),
        ))
        .streaming(body))
}

/// Writes the header, then page after page, until the range is exhausted or the client is gone
/// (the channel closed). A database failure midway ends the stream with the error: the client sees
/// the download cut short, never a file that looks whole.
fn stream_pages(
    pool: &PgPool,
    mut q: ReadingsQuery,
    columns: &[String],
    chunks: &mpsc::Sender<Result<Bytes, QueryError>>,
) {
    let mut header = String::from("ts,id");
    for column in columns {
        header.push(',');
        header.push_str(column);
    }
    header.push('\n');
    if chunks.blocking_send(Ok(Bytes::from(header))).is_err() {
        return;
    }
    loop {
        let page = pool
            .get()
            .map_err(store::StoreError::from)
            .and_then(|mut conn| store::read::readings_page(&mut conn, &q));
        let rows = match page {
            Ok(rows) => rows,
            Err(e) => {
                let _ = chunks.blocking_send(Err(QueryError::from(e)));
                return;
            }
        };
        let mut chunk = String::with_capacity(rows.len() * 48);
        for row in &rows {
            write_row(&mut chunk, row, columns);
        }
        if chunks.blocking_send(Ok(Bytes::from(chunk))).is_err() {
            return;
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == q.limit => {
                q.before = Some((last.ts, last.reading_id.clone()));
            }
            _ => return,
        }
    }
}

/// One reading's row. An id may hold `,` or `"` (any printable ASCII), so it is always quoted;
/// metric names and numbers never need it.
fn write_row(out: &mut String, row: &StoredReading, columns: &[String]) {
    let _ = write!(
        out,
        "{},\"{}\"",
        row.ts.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        row.reading_id.replace('"', "\"\"")
    );
    for column in columns {
        out.push(',');
        if let Some(value) = row.metrics.get(column).and_then(serde_json::Value::as_f64) {
            let _ = write!(out, "{value}");
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_quotes_its_id_and_leaves_missing_metrics_empty() {
        let row = StoredReading {
            ts: chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00.5Z")
                .unwrap()
                .to_utc(),
            reading_id: r#"a,"b""#.to_owned(),
            metrics: serde_json::json!({"t": 21.5, "h": -3.0}),
        };
        let mut out = String::new();
        write_row(&mut out, &row, &["t".into(), "co2".into(), "h".into()]);
        assert_eq!(out, "2026-11-24T10:00:00.500Z,\"a,\"\"b\"\"\",21.5,,-3\n");
    }
}
