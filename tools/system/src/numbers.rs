//! Numbers as the tools' reports print them.

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `12,345` for large numbers, `12.3` / `1.23` for small ones.
pub fn readable(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    if v.abs() >= 100.0 {
        let n = v.round() as i64;
        let grouped = thousands(n.unsigned_abs());
        if n < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.abs() >= 10.0 || v == v.trunc() {
        format!("{v:.1}").trim_end_matches(".0").to_owned()
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(readable(1234567.4), "1,234,567");
        assert_eq!(readable(-1234.4), "-1,234");
        assert_eq!(readable(512.0), "512");
        assert_eq!(readable(12.34), "12.3");
        assert_eq!(readable(1.234), "1.23");
        assert_eq!(readable(0.0), "0");
    }
}
