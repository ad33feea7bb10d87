//! Figures out of Prometheus's text format, as a service's `/metrics` page serves it.

/// A sample's value (`name` with its labels, as written), 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    sample(text, name).unwrap_or(0.0)
}

/// A sample's value (`name` with its labels, as written), `None` when the page has no such sample.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Of `series` (names with their labels, as written), those the page does not show at 0: what an
/// alert on the first increase would miss. Empty when every one is there at 0.
pub fn not_at_zero<'a>(text: &str, series: &[&'a str]) -> Vec<(&'a str, Option<f64>)> {
    series
        .iter()
        .map(|name| (*name, sample(text, name)))
        .filter(|(_, value)| *value != Some(0.0))
        .collect()
}

/// Every name a query can use on this page: those it shows samples of, and those its `# TYPE`
/// lines declare (a labelled family none of whose label sets exists yet has no samples): a
/// counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
pub fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = sample_names(text);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// Every metric name the page shows samples of (histograms' `_bucket`, `_sum` and `_count` each).
pub fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
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
        assert_eq!(sample(PAGE, "absent"), None);
    }

    #[test]
    fn tells_which_series_are_missing_or_not_at_zero() {
        let page = "a_total 0\nb_total{reason=\"x\"} 0\nc_total 2\n";
        assert_eq!(
            not_at_zero(
                page,
                &["a_total", "b_total{reason=\"x\"}", "c_total", "d_total"]
            ),
            [("c_total", Some(2.0)), ("d_total", None)]
        );
        assert_eq!(
            sample_names(PAGE).into_iter().collect::<Vec<_>>(),
            ["accepted_total", "accepted_total_created", "q"]
        );
        let declared = "# TYPE c counter\n# TYPE h histogram\n# TYPE g gauge\n";
        assert_eq!(
            exported_names(declared).into_iter().collect::<Vec<_>>(),
            ["c_total", "g", "h_bucket", "h_count", "h_sum"]
        );
    }
}
