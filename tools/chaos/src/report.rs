//! The table (Markdown) and the figures (JSON).

use std::fmt::Write as _;

use system::numbers::thousands;

use crate::recovery::Recovery;
use crate::run::StepOutcome;

/// What a step's row says in its last column.
fn verdict(outcome: &StepOutcome) -> String {
    if outcome.clean() {
        "✅".to_owned()
    } else if outcome.known_gap.is_some() {
        "⚠️ known gap".to_owned()
    } else {
        "❌".to_owned()
    }
}

/// One row per step. In cluster mode (steps that watched their recovery) two more columns say
/// when, after the fault, the devices were acknowledged again and readings stored again.
pub fn table(outcomes: &[StepOutcome]) -> String {
    let recovery = outcomes.iter().any(|o| o.acks_recovery.is_some());
    let mut out = if recovery {
        String::from(
            "| fault | sent | acknowledged | stored | lost | duplicated | rollups ≠ raw | retries | acks back after | stored again after | caught up in | |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        )
    } else {
        String::from(
            "| fault | sent | acknowledged | stored | lost | duplicated | rollups ≠ raw | retries | caught up in | |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        )
    };
    for o in outcomes {
        let mut catch_up = o
            .catch_up_secs
            .map_or_else(|| "never".to_owned(), |s| format!("{s:.1} s"));
        if recovery {
            catch_up = format!(
                "{} | {} | {catch_up}",
                Recovery::cell(o.acks_recovery.as_ref()),
                Recovery::cell(o.stores_recovery.as_ref())
            );
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            o.name,
            thousands(o.sent),
            thousands(o.acknowledged),
            thousands(o.stored),
            thousands(o.lost),
            thousands(o.duplicated),
            thousands(o.rollups_differing),
            thousands(o.retries),
            catch_up,
            verdict(o)
        );
    }
    out
}

/// What happened in each step beyond the counts: refusals the devices saw, what was observed.
pub fn details(outcomes: &[StepOutcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        let mut parts = vec![format!(
            "{} of the acknowledged over MQTT",
            thousands(o.acknowledged_mqtt)
        )];
        if let (Some(acks), Some(stores)) = (&o.acks_recovery, &o.stores_recovery) {
            parts.push(format!(
                "longest pause after the fault: {:.1} s without an HTTP acknowledgement, {:.1} s \
                 without a reading stored",
                acks.longest_pause_secs, stores.longest_pause_secs
            ));
        }
        parts.extend(o.notes.iter().cloned());
        if !o.refusals.is_empty() {
            let seen: Vec<String> = o
                .refusals
                .iter()
                .map(|(why, n)| format!("{why} ×{}", thousands(*n)))
                .collect();
            parts.push(format!("devices saw: {}", seen.join(", ")));
        }
        if o.unacknowledged > 0 {
            parts.push(format!(
                "{} readings never acknowledged",
                thousands(o.unacknowledged)
            ));
        }
        if let Some(c) = &o.commands {
            let finished = c.finished_in_secs.map_or_else(
                || "not all in time".to_owned(),
                |s| format!("all within {s:.1} s"),
            );
            parts.push(format!(
                "commands: {} issued, {} succeeded with one answer each ({finished}), {} not; {} deliveries",
                c.issued, c.succeeded, c.unfinished, c.deliveries
            ));
        }
        if let Some(gap) = o.known_gap {
            parts.push(format!("known gap: {gap}"));
        }
        let _ = writeln!(out, "- **{}**: {}.", o.name, parts.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Fault;
    use std::collections::BTreeMap;

    fn outcome(lost: u64, gap: Option<&'static str>) -> StepOutcome {
        StepOutcome {
            name: "SIGKILL persister".into(),
            tag: "s01".into(),
            fault: Fault::MemoryAlarm {
                held: std::time::Duration::from_secs(1),
            },
            known_gap: gap,
            sent: 12_345,
            acknowledged: 12_000,
            acknowledged_mqtt: 4_000,
            stored: 12_000 - lost,
            lost,
            duplicated: 0,
            rollups_differing: 0,
            unacknowledged: 0,
            retries: 7,
            refusals: BTreeMap::from([("HTTP 503".to_owned(), 7)]),
            catch_up_secs: Some(1.25),
            notes: vec!["killed while a batch was being written".into()],
            commands: None,
            acks_recovery: None,
            stores_recovery: None,
            acknowledged_ids: vec![],
        }
    }

    #[test]
    fn a_row_per_step_with_its_verdict() {
        let text = table(&[outcome(0, None), outcome(3, None), outcome(3, Some("why"))]);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].contains("| 12,345 | 12,000 | 12,000 | 0 | 0 | 0 | 7 | 1.2 s | ✅ |"));
        assert!(rows[1].ends_with("❌ |"));
        assert!(rows[2].ends_with("⚠️ known gap |"));
        let details = details(&[outcome(3, Some("why"))]);
        assert!(details.contains("HTTP 503 ×7") && details.contains("known gap: why"));
        assert!(details.contains("4,000 of the acknowledged over MQTT"));
    }

    #[test]
    fn with_recovery_watched_the_table_says_when_acks_and_stores_came_back() {
        let mut step = outcome(0, None);
        step.acks_recovery = Some(Recovery {
            longest_pause_secs: 2.0,
            back_after_secs: Some(2.5),
        });
        step.stores_recovery = Some(Recovery {
            longest_pause_secs: 0.1,
            back_after_secs: Some(0.0),
        });
        let text = table(&[step]);
        assert!(
            text.starts_with("| fault |")
                && text.contains("| acks back after | stored again after |")
        );
        assert!(
            text.lines()
                .nth(2)
                .unwrap()
                .contains("| 7 | 2.5 s (paused 2.0 s) | no pause | 1.2 s | ✅ |")
        );
    }

    #[test]
    fn an_unfinished_command_fails_the_step() {
        let mut step = outcome(0, None);
        step.commands = Some(crate::commands::CommandOutcome {
            issued: 4,
            succeeded: 3,
            unfinished: 1,
            deliveries: 7,
            finished_in_secs: None,
        });
        assert!(
            table(std::slice::from_ref(&step))
                .lines()
                .nth(2)
                .unwrap()
                .ends_with("❌ |")
        );
        assert!(details(&[step]).contains("commands: 4 issued, 3 succeeded"));
    }
}
