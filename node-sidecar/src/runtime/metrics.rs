//! Reads the few vLLM Prometheus series the sidecar reports (running, waiting, KV-cache use,
//! generated tokens), summed over label sets (one per served model).

/// The load figures taken from vLLM's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VllmMetrics {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// 0.0–1.0.
    pub kv_cache_usage: Option<f64>,
    pub generation_tokens_total: Option<f64>,
}

impl VllmMetrics {
    /// Parses Prometheus text exposition; unknown or malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name_labels, rest) = match line.find('}') {
                Some(i) => (&line[..=i], &line[i + 1..]),
                None => match line.split_once(char::is_whitespace) {
                    Some((n, r)) => (n, r),
                    None => continue,
                },
            };
            let name = name_labels.split('{').next().unwrap_or_default();
            let Some(value) = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
            else {
                continue;
            };
            let slot = match name {
                "vllm:num_requests_running" => &mut m.running,
                "vllm:num_requests_waiting" => &mut m.waiting,
                // Renamed in vLLM 0.10 (`gpu_` prefix dropped); read whichever is there.
                "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                    if m.kv_cache_usage.is_none() {
                        m.kv_cache_usage = Some(value);
                    }
                    continue;
                }
                "vllm:generation_tokens_total" => &mut m.generation_tokens_total,
                _ => continue,
            };
            *slot = Some(slot.unwrap_or(0.0) + value);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums_over_models() {
        let text = "# HELP x\n# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{model_name=\"a\"} 3\n\
            vllm:num_requests_running{model_name=\"b\"} 2.0\n\
            vllm:num_requests_waiting{model_name=\"a\"} 7\n\
            vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.25\n\
            vllm:generation_tokens_total{model_name=\"a\",x=\"}\"} 100\n\
            garbage line\nvllm:num_requests_waiting NaN\n";
        let m = VllmMetrics::parse(text);
        assert_eq!(m.running, Some(5.0));
        assert_eq!(m.waiting, Some(7.0));
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(VllmMetrics::parse("").running, None);
    }
}
