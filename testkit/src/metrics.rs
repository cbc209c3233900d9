//! Values read from a Prometheus scrape (`Daemon::metrics`).

/// The value of the sample `name{labels}` (or a bare `name`) in a
/// Prometheus scrape; 0 when absent.
pub fn metric(scrape: &str, name_and_labels: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
