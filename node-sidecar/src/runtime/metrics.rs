//! Reads the load figures the sidecar reports (running, waiting, KV-cache use, generated
//! tokens) from a runtime's Prometheus text, whichever OpenAI-compatible server wrote it:
//! vLLM (`vllm:`), llama.cpp's `llama-server` (`llamacpp:`) or SGLang (`sglang:`). Series are
//! summed over label sets (one per served model).

/// Which server family's metric names were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFamily {
    Vllm,
    LlamaCpp,
    Sglang,
}

/// The load figures taken from a runtime's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadMetrics {
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    /// 0.0–1.0.
    pub kv_cache_usage: Option<f64>,
    pub generation_tokens_total: Option<f64>,
    /// The family whose names were read; `None` when no known series was present.
    pub family: Option<MetricsFamily>,
}

/// Where a series goes.
#[derive(Clone, Copy)]
enum Field {
    Running,
    Waiting,
    KvCache,
    Tokens,
}

fn field_of(name: &str) -> Option<(MetricsFamily, Field)> {
    use Field::*;
    use MetricsFamily::*;
    Some(match name {
        "vllm:num_requests_running" => (Vllm, Running),
        "vllm:num_requests_waiting" => (Vllm, Waiting),
        // Renamed in vLLM 0.10 (`gpu_` prefix dropped); read whichever is there.
        "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => (Vllm, KvCache),
        "vllm:generation_tokens_total" => (Vllm, Tokens),
        "llamacpp:requests_processing" => (LlamaCpp, Running),
        "llamacpp:requests_deferred" => (LlamaCpp, Waiting),
        "llamacpp:kv_cache_usage_ratio" => (LlamaCpp, KvCache),
        "llamacpp:tokens_predicted_total" => (LlamaCpp, Tokens),
        "sglang:num_running_reqs" => (Sglang, Running),
        "sglang:num_queue_reqs" => (Sglang, Waiting),
        "sglang:token_usage" => (Sglang, KvCache),
        "sglang:generation_tokens_total" => (Sglang, Tokens),
        _ => return None,
    })
}

impl LoadMetrics {
    /// Parses Prometheus text exposition; unknown or malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            let Some((name, value)) = sample(line) else {
                continue;
            };
            let Some((family, field)) = field_of(name) else {
                continue;
            };
            // One server exports one family; the first one seen wins so a stray series of
            // another family cannot mix figures.
            if *m.family.get_or_insert(family) != family {
                continue;
            }
            let slot = match field {
                Field::Running => &mut m.running,
                Field::Waiting => &mut m.waiting,
                Field::KvCache => {
                    if m.kv_cache_usage.is_none() {
                        m.kv_cache_usage = Some(value);
                    }
                    continue;
                }
                Field::Tokens => &mut m.generation_tokens_total,
            };
            *slot = Some(slot.unwrap_or(0.0) + value);
        }
        m
    }
}

/// Name and finite value of one sample line; `None` for comments, blanks and garbage. Label
/// values may contain `}`, so the label set ends at the last `}`.
pub(crate) fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match (line.find('{'), line.rfind('}')) {
        (Some(open), Some(close)) if open < close => (&line[..open], &line[close + 1..]),
        _ => line.split_once(char::is_whitespace)?,
    };
    let value = rest
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())?;
    Some((name.trim(), value))
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
        let m = LoadMetrics::parse(text);
        assert_eq!(m.running, Some(5.0));
        assert_eq!(m.waiting, Some(7.0));
        assert_eq!(m.kv_cache_usage, Some(0.25));
        assert_eq!(m.generation_tokens_total, Some(100.0));
        assert_eq!(m.family, Some(MetricsFamily::Vllm));
        assert_eq!(LoadMetrics::parse("").running, None);
        assert_eq!(LoadMetrics::parse("").family, None);
    }

    #[test]
    fn reads_llama_cpp_and_sglang_names() {
        let llama = "# HELP llamacpp:requests_processing Number of requests processing.\n\
            # TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n\
            llamacpp:requests_deferred 9\nllamacpp:tokens_predicted_total 1234\n\
            llamacpp:kv_cache_usage_ratio 0.5\nllamacpp:n_busy_slots_per_decode 1\n";
        let m = LoadMetrics::parse(llama);
        assert_eq!(m.family, Some(MetricsFamily::LlamaCpp));
        assert_eq!(
            (m.running, m.waiting, m.generation_tokens_total),
            (Some(4.0), Some(9.0), Some(1234.0))
        );
        assert_eq!(m.kv_cache_usage, Some(0.5));
        let sglang = "sglang:num_running_reqs{model_name=\"q\"} 2\n\
            sglang:num_queue_reqs{model_name=\"q\"} 1\nsglang:token_usage{model_name=\"q\"} 0.1\n";
        let m = LoadMetrics::parse(sglang);
        assert_eq!(m.family, Some(MetricsFamily::Sglang));
        assert_eq!((m.running, m.waiting), (Some(2.0), Some(1.0)));
    }

    #[test]
    fn unknown_names_give_no_family() {
        let m = LoadMetrics::parse("process_cpu_seconds_total 3\nhttp_requests_total{a=\"b\"} 1\n");
        assert_eq!(m, LoadMetrics::default());
    }
}
