//! The checker: pure functions over a recorded history. No I/O, no clock:
//! every time is in microseconds since the start of the run, as the harness
//! recorded it.
//!
//! The portal's promise, checked here: no write is ever acknowledged by a
//! member that is not the real primary of that moment. The harness makes
//! every promotion itself, so it knows the truth: a timeline of reigns
//! (which server process was the real primary, from when, until when).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

/// Microseconds since the start of the run.
pub type Micros = u64;

/// Formats a time or a duration in seconds with millisecond precision.
pub fn secs(t: Micros) -> String {
    format!("{:.3}s", t as f64 / 1e6)
}

/// Which server acknowledged a write: asked on the same connection right
/// after the acknowledgement (`INFO server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Redis `run_id` (a new one at every start of the process).
    pub run_id: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server said the write was done, at `at`; `by` is the server that
    /// said so, `None` when the session closed before it could be asked.
    Acked { at: Micros, by: Option<Identity> },
    /// An error reply (the portal's `TRYAGAIN`, a replica's `READONLY`):
    /// the write was not done.
    Failed { at: Micros, error: String },
    /// No reply (timeout, closed connection): it may or may not be done.
    Unknown { at: Micros, error: String },
}

/// One write attempt: `RPUSH chaos:<writer> <value>` through portal `portal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub writer: u32,
    pub portal: usize,
    pub value: u64,
    pub sent: Micros,
    pub outcome: Outcome,
}

impl Write {
    pub fn acked_at(&self) -> Option<Micros> {
        match self.outcome {
            Outcome::Acked { at, .. } => Some(at),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        let by = match &self.outcome {
            Outcome::Acked { at, by } => format!(
                "acked at {} by {}",
                secs(*at),
                by.as_ref()
                    .map(|i| format!("run_id {} port {}", short(&i.run_id), i.port))
                    .unwrap_or_else(|| "an unknown server".into())
            ),
            other => format!("{other:?}"),
        };
        format!(
            "write chaos:{}:{} via portal {} sent at {} {by}",
            self.writer,
            self.value,
            self.portal + 1,
            secs(self.sent)
        )
    }
}

/// The first 8 characters of a run id, enough to tell processes apart in a
/// report.
pub fn short(run_id: &str) -> &str {
    &run_id[..run_id.len().min(8)]
}

/// One server process's time as the real primary: from the moment the
/// harness sent `REPLICAOF NO ONE` to it (or from the start) until the
/// moment its `kill -9` returned (`to`, `None` while it still reigns).
/// `killed` says the reign ended by a `kill -9`, so writes it acknowledged
/// and had not yet replicated may be lost by the database. (The Sentinel
/// target derives its reigns from what it observed, and also sets `killed`
/// when a reign ended because Sentinel promoted another member: the old
/// primary's unreplicated writes are then lost the same way.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reign {
    pub run_id: String,
    pub member: String,
    pub from: Micros,
    pub to: Option<Micros>,
    pub killed: bool,
}

impl Reign {
    /// Whether the reign overlaps `[from, to]`.
    fn overlaps(&self, from: Micros, to: Micros) -> bool {
        self.from <= to && self.to.is_none_or(|end| end >= from)
    }
}

/// The real primary at time `t`, if any.
pub fn primary_at(truth: &[Reign], t: Micros) -> Option<&Reign> {
    truth.iter().find(|r| r.overlaps(t, t))
}

/// One `/status` sample of one portal process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub portal: usize,
    /// Which process of that portal (0 at start, +1 at each restart).
    pub incarnation: u32,
    pub at: Micros,
    pub epoch: u64,
    pub leader: Option<String>,
    pub term: Option<String>,
}

/// One check that both portals agree, made once every fault had healed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// When everything had healed.
    pub settled_at: Micros,
    /// How long until both portals named the real primary with the same
    /// term; `None` when they did not within the bound.
    pub took: Option<Micros>,
    /// What they showed last (for a failure).
    pub detail: String,
}

/// Everything the harness recorded in one run.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub writes: Vec<Write>,
    pub truth: Vec<Reign>,
    pub samples: Vec<Sample>,
    pub agreements: Vec<Agreement>,
    /// What each server process (by run id) was: for reports.
    pub processes: HashMap<String, String>,
    /// Each writer's values read back from the final primary; `None` when the
    /// read-back failed.
    pub final_data: Option<HashMap<u32, HashSet<u64>>>,
    /// The span the writers ran over (for unavailability).
    pub writers_from: Micros,
    pub writers_to: Micros,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub writes: usize,
    pub acked: usize,
    pub acked_without_identity: usize,
    /// The headline: acknowledged by a server that was not the real primary
    /// at any moment of the write's `[sent, acked]` window. Must be empty.
    pub non_primary: Vec<String>,
    /// How many of those went through each portal (index 0 = portal 1).
    pub non_primary_by_portal: BTreeMap<usize, usize>,
    /// Acknowledged, missing from the final primary, and not explained by a
    /// `kill -9` of the primary that acknowledged it. Must be empty.
    pub lost_by_portal: Vec<String>,
    /// Acknowledged by a primary later killed with `kill -9`, and missing
    /// (asynchronous replication: allowed, counted apart).
    pub lost_by_database: usize,
    /// Acknowledged by an unknown server (no identity) and missing, while a
    /// primary that was later killed reigned during the write: possibly lost
    /// by the database.
    pub lost_unknown_by_database: usize,
    pub epoch_regressions: Vec<String>,
    pub term_regressions: Vec<String>,
    pub agreement_failures: Vec<String>,
    pub longest_agree: Micros,
    /// Longest span with no acknowledged write through either portal, and
    /// when it started.
    pub longest_unavailability: (Micros, Micros),
    /// The final read-back could not be done.
    pub read_back_failed: bool,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.non_primary.is_empty()
            && self.lost_by_portal.is_empty()
            && self.epoch_regressions.is_empty()
            && self.term_regressions.is_empty()
            && self.agreement_failures.is_empty()
            && !self.read_back_failed
    }

    /// Every failure, a few of each kind, as text.
    pub fn failures(&self) -> String {
        let mut out = String::new();
        fn list(out: &mut String, title: &str, items: &[String]) {
            if items.is_empty() {
                return;
            }
            let _ = writeln!(out, "{title}: {}", items.len());
            for item in items.iter().take(8) {
                let _ = writeln!(out, "  - {item}");
            }
            if items.len() > 8 {
                let _ = writeln!(out, "  - ... and {} more", items.len() - 8);
            }
        }
        list(&mut out, "written to a non-primary", &self.non_primary);
        if !self.non_primary_by_portal.is_empty() {
            let by: Vec<String> = self
                .non_primary_by_portal
                .iter()
                .map(|(p, n)| format!("portal {}: {n}", p + 1))
                .collect();
            let _ = writeln!(out, "  (through {})", by.join(", "));
        }
        list(&mut out, "lost by the portal", &self.lost_by_portal);
        list(&mut out, "epoch went back", &self.epoch_regressions);
        list(&mut out, "leader_term went back", &self.term_regressions);
        list(&mut out, "portals did not agree", &self.agreement_failures);
        if self.read_back_failed {
            out.push_str("the final read-back from the primary failed\n");
        }
        out
    }
}

/// Runs every check.
pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict {
        writes: history.writes.len(),
        ..Verdict::default()
    };
    for w in &history.writes {
        if let Outcome::Acked { by, .. } = &w.outcome {
            verdict.acked += 1;
            if by.is_none() {
                verdict.acked_without_identity += 1;
            }
        }
    }
    let non_primary = written_to_non_primary(&history.writes, &history.truth);
    for w in &non_primary {
        *verdict.non_primary_by_portal.entry(w.portal).or_default() += 1;
    }
    verdict.non_primary = non_primary
        .into_iter()
        .map(|w| describe_non_primary(w, history))
        .collect();
    match &history.final_data {
        Some(data) => {
            let lost = lost_writes(&history.writes, &history.truth, data);
            verdict.lost_by_portal = lost
                .by_portal
                .iter()
                .map(|w| format!("{} (missing from the final primary)", w.describe()))
                .collect();
            verdict.lost_by_database = lost.by_database;
            verdict.lost_unknown_by_database = lost.unknown_by_database;
        }
        None => verdict.read_back_failed = true,
    }
    verdict.epoch_regressions = epoch_regressions(&history.samples);
    verdict.term_regressions = term_regressions(&history.samples, &history.truth);
    for a in &history.agreements {
        match a.took {
            Some(took) => verdict.longest_agree = verdict.longest_agree.max(took),
            None => verdict.agreement_failures.push(format!(
                "settled at {}: no agreement on the real primary: {}",
                secs(a.settled_at),
                a.detail
            )),
        }
    }
    verdict.longest_unavailability =
        longest_unavailability(&history.writes, history.writers_from, history.writers_to);
    verdict
}

fn describe_non_primary(w: &Write, history: &History) -> String {
    let Outcome::Acked { at, by: Some(by) } = &w.outcome else {
        return w.describe();
    };
    let what = history
        .processes
        .get(&by.run_id)
        .cloned()
        .unwrap_or_else(|| "a server the harness does not know".into());
    let real = primary_at(&history.truth, *at)
        .map(|r| format!("{} (run_id {})", r.member, short(&r.run_id)))
        .unwrap_or_else(|| "none".into());
    format!(
        "{}; the acknowledger was {what}; the real primary then: {real}",
        w.describe()
    )
}

/// Acknowledged writes whose acknowledger was not the real primary at any
/// moment of `[sent, acked]`. Writes without an identity are not judged here
/// (they are checked by the data).
pub fn written_to_non_primary<'a>(writes: &'a [Write], truth: &[Reign]) -> Vec<&'a Write> {
    writes
        .iter()
        .filter(|w| match &w.outcome {
            Outcome::Acked { at, by: Some(by) } => !truth
                .iter()
                .any(|r| r.run_id == by.run_id && r.overlaps(w.sent, *at)),
            _ => false,
        })
        .collect()
}

/// Acknowledged writes missing from the final data, attributed.
#[derive(Debug, Default)]
pub struct Lost<'a> {
    pub by_portal: Vec<&'a Write>,
    pub by_database: usize,
    pub unknown_by_database: usize,
}

/// Acknowledged writes missing from `data` (each writer's values on the
/// final primary). One acknowledged by a reign that ended in a `kill -9`
/// is lost by the database; one acknowledged by an unknown server is lost by
/// the database when a reign that overlapped the write ended in a `kill -9`;
/// every other one is lost by the portal.
pub fn lost_writes<'a>(
    writes: &'a [Write],
    truth: &[Reign],
    data: &HashMap<u32, HashSet<u64>>,
) -> Lost<'a> {
    let mut lost = Lost::default();
    for w in writes {
        let Outcome::Acked { at, by } = &w.outcome else {
            continue;
        };
        if data.get(&w.writer).is_some_and(|v| v.contains(&w.value)) {
            continue;
        }
        match by {
            Some(by) => {
                let killed = truth
                    .iter()
                    .any(|r| r.run_id == by.run_id && r.killed && r.overlaps(w.sent, *at));
                if killed {
                    lost.by_database += 1;
                } else {
                    lost.by_portal.push(w);
                }
            }
            None => {
                let killed = truth.iter().any(|r| r.killed && r.overlaps(w.sent, *at));
                if killed {
                    lost.unknown_by_database += 1;
                } else {
                    lost.by_portal.push(w);
                }
            }
        }
    }
    lost
}

/// Samples in which a portal process showed a smaller epoch than it had
/// shown before (a restarted portal counts anew).
pub fn epoch_regressions(samples: &[Sample]) -> Vec<String> {
    let mut last: BTreeMap<(usize, u32), &Sample> = BTreeMap::new();
    let mut found = Vec::new();
    let mut ordered: Vec<&Sample> = samples.iter().collect();
    ordered.sort_by_key(|s| s.at);
    for s in ordered {
        let key = (s.portal, s.incarnation);
        if let Some(prev) = last.get(&key) {
            if s.epoch < prev.epoch {
                found.push(format!(
                    "portal {} (process #{}) showed epoch {} at {} after epoch {} at {}",
                    s.portal + 1,
                    s.incarnation,
                    s.epoch,
                    secs(s.at),
                    prev.epoch,
                    secs(prev.at)
                ));
            }
        }
        last.insert(key, s);
    }
    found
}

/// The identity of a leader term: a Redis term `replid:ID (after PREV)` is
/// `ID`; anything else (a PostgreSQL timeline) is itself.
pub fn term_id(term: &str) -> &str {
    match term.strip_prefix("replid:") {
        Some(rest) => rest.split_whitespace().next().unwrap_or(rest),
        None => term.trim(),
    }
}

/// Samples in which a portal showed a leader term it had shown before
/// another, newer one: going back. Per portal, over all its processes.
pub fn term_regressions(samples: &[Sample], truth: &[Reign]) -> Vec<String> {
    let mut ordered: Vec<&Sample> = samples.iter().collect();
    ordered.sort_by_key(|s| s.at);
    // When the truth itself went back (a process reigns again after another
    // one did: Patroni handed the leader key back to an old primary), the
    // portals may follow it back: the history starts over.
    let mut resets: Vec<Micros> = truth
        .iter()
        .filter(|r| {
            truth
                .iter()
                .any(|e| e.run_id == r.run_id && e.to.is_some_and(|to| to <= r.from))
        })
        .map(|r| r.from)
        .collect();
    resets.sort_unstable();
    let mut resets = resets.into_iter().peekable();
    // Per portal: the distinct term ids in the order first shown, and the
    // one shown last.
    let mut seen: HashMap<usize, (Vec<String>, Option<String>)> = HashMap::new();
    let mut found = Vec::new();
    for s in ordered {
        if resets.next_if(|&r| r <= s.at).is_some() {
            while resets.next_if(|&r| r <= s.at).is_some() {}
            for (order, _) in seen.values_mut() {
                order.clear();
            }
        }
        let Some(term) = &s.term else { continue };
        let id = term_id(term).to_string();
        let (order, current) = seen.entry(s.portal).or_default();
        if current.as_deref() == Some(id.as_str()) {
            continue;
        }
        if let Some(pos) = order.iter().position(|t| *t == id) {
            found.push(format!(
                "portal {} (process #{}) at {} went back to term {} (leader {}) after showing {}",
                s.portal + 1,
                s.incarnation,
                secs(s.at),
                short(&id),
                s.leader.as_deref().unwrap_or("none"),
                order[pos + 1..]
                    .iter()
                    .map(|t| short(t).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else {
            order.push(id.clone());
        }
        *current = Some(id);
    }
    found
}

/// The longest span within `[from, to]` with no acknowledgement, and when it
/// began.
pub fn longest_unavailability(writes: &[Write], from: Micros, to: Micros) -> (Micros, Micros) {
    let mut acks: Vec<Micros> = writes
        .iter()
        .filter_map(Write::acked_at)
        .filter(|&t| t >= from && t <= to)
        .collect();
    acks.sort_unstable();
    let mut best = (0, from);
    let mut prev = from;
    for t in acks.into_iter().chain(std::iter::once(to)) {
        if t.saturating_sub(prev) > best.0 {
            best = (t - prev, prev);
        }
        prev = t;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Micros = 1000;

    fn reign(run_id: &str, from: Micros, to: Option<Micros>, killed: bool) -> Reign {
        Reign {
            run_id: run_id.into(),
            member: format!("member-{run_id}"),
            from,
            to,
            killed,
        }
    }

    fn acked(writer: u32, value: u64, sent: Micros, at: Micros, by: Option<&str>) -> Write {
        Write {
            writer,
            portal: 0,
            value,
            sent,
            outcome: Outcome::Acked {
                at,
                by: by.map(|r| Identity {
                    run_id: r.into(),
                    port: 1,
                }),
            },
        }
    }

    /// `a` reigns until it is killed at 1 s; `b` from 1.5 s on.
    fn truth() -> Vec<Reign> {
        vec![
            reign("a", 0, Some(1000 * MS), true),
            reign("b", 1500 * MS, None, false),
        ]
    }

    fn data(values: &[(u32, &[u64])]) -> HashMap<u32, HashSet<u64>> {
        values
            .iter()
            .map(|(w, v)| (*w, v.iter().copied().collect()))
            .collect()
    }

    fn history(writes: Vec<Write>, final_data: HashMap<u32, HashSet<u64>>) -> History {
        History {
            writes,
            truth: truth(),
            final_data: Some(final_data),
            writers_from: 0,
            writers_to: 3000 * MS,
            ..History::default()
        }
    }

    fn sample(portal: usize, incarnation: u32, at: Micros, epoch: u64, term: &str) -> Sample {
        Sample {
            portal,
            incarnation,
            at,
            epoch,
            leader: Some("a".into()),
            term: (!term.is_empty()).then(|| term.to_string()),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let writes = vec![
            acked(1, 1, 10 * MS, 11 * MS, Some("a")),
            acked(1, 2, 1600 * MS, 1601 * MS, Some("b")),
            acked(1, 3, 2000 * MS, 2001 * MS, None),
        ];
        let v = check(&history(writes, data(&[(1, &[1, 2, 3])])));
        assert!(v.ok(), "{}", v.failures());
        assert_eq!((v.acked, v.acked_without_identity), (3, 1));
    }

    #[test]
    fn a_write_acked_by_an_empty_restarted_master_fails() {
        let writes = vec![acked(1, 1, 1600 * MS, 1601 * MS, Some("rogue"))];
        let v = check(&history(writes, data(&[(1, &[])])));
        assert!(!v.ok());
        assert_eq!(v.non_primary.len(), 1, "{}", v.failures());
        // Missing from the final primary and not explained by a kill.
        assert_eq!(v.lost_by_portal.len(), 1, "{}", v.failures());
        assert_eq!(v.lost_by_database, 0);
    }

    #[test]
    fn an_ack_by_the_old_primary_after_its_reign_fails_and_one_inside_passes() {
        let inside = acked(1, 1, 990 * MS, 1010 * MS, Some("a"));
        let after = acked(1, 2, 1100 * MS, 1200 * MS, Some("a"));
        let before_b = acked(1, 3, 1200 * MS, 1400 * MS, Some("b"));
        let writes = vec![inside, after.clone(), before_b.clone()];
        let found = written_to_non_primary(&writes, &truth());
        assert_eq!(found, vec![&after, &before_b]);
    }

    #[test]
    fn a_lost_write_is_the_databases_only_when_its_primary_was_killed() {
        let by_a = acked(1, 1, 10 * MS, 11 * MS, Some("a"));
        let by_b = acked(1, 2, 1600 * MS, 1601 * MS, Some("b"));
        let unknown_during_a = acked(2, 1, 500 * MS, 501 * MS, None);
        let unknown_during_b = acked(2, 2, 2000 * MS, 2001 * MS, None);
        let writes = vec![
            by_a,
            by_b.clone(),
            unknown_during_a,
            unknown_during_b.clone(),
        ];
        let lost = lost_writes(&writes, &truth(), &data(&[(1, &[]), (2, &[])]));
        assert_eq!(lost.by_database, 1);
        assert_eq!(lost.unknown_by_database, 1);
        assert_eq!(lost.by_portal, vec![&by_b, &unknown_during_b]);
    }

    #[test]
    fn unacknowledged_writes_are_never_judged() {
        let mut failed = acked(1, 1, 1100 * MS, 1200 * MS, Some("rogue"));
        failed.outcome = Outcome::Failed {
            at: 1200 * MS,
            error: "TRYAGAIN".into(),
        };
        let mut unknown = failed.clone();
        unknown.value = 2;
        unknown.outcome = Outcome::Unknown {
            at: 1200 * MS,
            error: "timeout".into(),
        };
        let v = check(&history(vec![failed, unknown], data(&[])));
        assert!(v.ok(), "{}", v.failures());
        assert_eq!(v.acked, 0);
    }

    #[test]
    fn an_epoch_going_back_fails_except_across_a_restart() {
        let samples = vec![
            sample(0, 0, 1, 5, ""),
            sample(0, 0, 2, 6, ""),
            sample(0, 1, 3, 1, ""),
            sample(0, 1, 4, 2, ""),
            sample(1, 0, 5, 3, ""),
        ];
        assert!(epoch_regressions(&samples).is_empty());
        let mut bad = samples.clone();
        bad.push(sample(1, 0, 6, 2, ""));
        assert_eq!(epoch_regressions(&bad).len(), 1, "{bad:?}");
    }

    #[test]
    fn a_term_going_back_fails() {
        let x = "replid:xxx";
        let y = "replid:yyy (after xxx)";
        let fine = vec![
            sample(0, 0, 1, 1, x),
            sample(0, 0, 2, 1, ""),
            sample(0, 0, 3, 1, x),
            sample(0, 0, 4, 2, y),
            sample(1, 0, 5, 2, x),
        ];
        assert!(term_regressions(&fine, &[]).is_empty());
        let mut back = fine.clone();
        back.push(sample(0, 0, 6, 3, x));
        let found = term_regressions(&back, &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("went back to term xxx"), "{found:?}");
        // Unless the truth went back first: the process that reigned on x
        // reigns again (from 6), after another one (2 to 5).
        let reign = |run_id: &str, from, to| Reign {
            run_id: run_id.into(),
            member: run_id.into(),
            from,
            to,
            killed: false,
        };
        let truth = vec![
            reign("p", 0, Some(2)),
            reign("q", 2, Some(5)),
            reign("p", 6, None),
        ];
        assert!(term_regressions(&back, &truth).is_empty());
        // A new process is not a going back.
        let truth = vec![
            reign("p", 0, Some(2)),
            reign("q", 2, Some(5)),
            reign("r", 6, None),
        ];
        assert_eq!(term_regressions(&back, &truth).len(), 1);
        assert_eq!(term_id(y), "yyy");
        assert_eq!(term_id("3"), "3");
    }

    #[test]
    fn portals_that_never_agree_fail() {
        let mut h = history(vec![], data(&[]));
        h.agreements = vec![
            Agreement {
                settled_at: 0,
                took: Some(300 * MS),
                detail: String::new(),
            },
            Agreement {
                settled_at: 5,
                took: None,
                detail: "portal 1: a, portal 2: b".into(),
            },
        ];
        let v = check(&h);
        assert_eq!(v.longest_agree, 300 * MS);
        assert_eq!(v.agreement_failures.len(), 1);
        assert!(!v.ok());
    }

    #[test]
    fn unavailability_is_the_longest_gap_between_acks() {
        let writes = vec![
            acked(1, 1, 0, 100 * MS, Some("a")),
            acked(1, 2, 0, 200 * MS, Some("a")),
            acked(1, 3, 0, 1700 * MS, Some("b")),
        ];
        assert_eq!(
            longest_unavailability(&writes, 0, 2000 * MS),
            (1500 * MS, 200 * MS)
        );
        assert_eq!(longest_unavailability(&[], 0, 50), (50, 0));
    }
}
