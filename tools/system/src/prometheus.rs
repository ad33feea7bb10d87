//! Figures out of Prometheus's text format, as a service's `/metrics` page serves it.

/// A sample's value (`name` with its labels, as written), 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of a metric family (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key.split('{').next()? == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `GET <base>/metrics`, then [`metric_sum`] of `name`.
pub async fn scrape_sum(client: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())?
        .text()
        .await?;
    Ok(metric_sum(&text, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP q messages\n# TYPE q gauge\nq 1234\n\
                        accepted_total{format=\"single\"} 3\naccepted_total{format=\"batch\"} 4.5\n\
                        accepted_total_created 17\n";

    #[test]
    fn reads_a_sample_and_sums_a_family() {
        assert_eq!(metric(PAGE, "q"), 1234.0);
        assert_eq!(metric(PAGE, "accepted_total{format=\"batch\"}"), 4.5);
        assert_eq!(metric(PAGE, "absent"), 0.0);
        assert_eq!(metric_sum(PAGE, "accepted_total"), 7.5);
    }
}
