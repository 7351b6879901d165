//! Where a LazyImage with a warm policy should be kept cached: pure functions, no I/O. The
//! controller feeds them the nodes as it sees them (labels, readiness, what each caches, free
//! cache room) and the nodes it ordered before, and sends orders for the difference.
//!
//! The choice, for `max_nodes` N out of the eligible nodes (ready, matching the selector):
//! - spread: nodes are taken round robin over the values of `spread_by` (the domain with the
//!   fewest chosen nodes next, ties by name), so no domain holds more than one node over another
//!   unless the other has no eligible node left;
//! - within a domain: nodes already ordered first (no flapping: re-running with the result as
//!   the current orders gives the same result), then the warmest, then the most free cache room,
//!   then by name (the same inputs always give the same choice, whatever their order).

use crate::crd::{WarmMode, WarmPolicy};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Ready, and its plugin reporting.
    pub ready: bool,
    /// Share of this image the node has cached, 0.0..=1.0.
    pub fill: f64,
    /// Cache room left, bytes.
    pub free_cache: u64,
}

/// Whether `node` may hold the image under `policy`.
pub fn eligible(policy: &WarmPolicy, node: &NodeView) -> bool {
    node.ready && policy.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
}

/// The nodes to keep the image warm on, given the nodes ordered so far (`current`).
pub fn place(policy: &WarmPolicy, nodes: &[NodeView], current: &BTreeSet<String>) -> BTreeSet<String> {
    if policy.mode == WarmMode::None {
        return BTreeSet::new();
    }
    // The same node twice (a stale view) counts once.
    let mut by_name: BTreeMap<&str, &NodeView> = BTreeMap::new();
    for n in nodes.iter().filter(|n| eligible(policy, n)) {
        by_name.entry(n.name.as_str()).or_insert(n);
    }
    let want = policy.max_nodes.map_or(by_name.len(), |m| (m as usize).min(by_name.len()));
    // Each domain's nodes, best first, and how many of them are taken.
    let mut domains: BTreeMap<&str, (Vec<&NodeView>, usize)> = BTreeMap::new();
    for n in by_name.values() {
        let d = policy.spread_by.as_ref().and_then(|k| n.labels.get(k)).map_or("", String::as_str);
        domains.entry(d).or_default().0.push(n);
    }
    let rank = |n: &&NodeView| {
        let fill_millis = (n.fill.clamp(0.0, 1.0) * 1000.0).round() as u64;
        (!current.contains(&n.name), Reverse(fill_millis), Reverse(n.free_cache), n.name.clone())
    };
    for (list, _) in domains.values_mut() {
        list.sort_by_key(rank);
    }
    let mut chosen = BTreeSet::new();
    while chosen.len() < want {
        // The domain with the fewest chosen nodes among those with nodes left; ties by name.
        let next = domains.iter_mut().filter(|(_, (list, taken))| *taken < list.len()).min_by_key(|(d, (_, taken))| (*taken, **d));
        let Some((_, (list, taken))) = next else { break };
        chosen.insert(list[*taken].name.clone());
        *taken += 1;
    }
    chosen
}

/// What to tell nodes to go from the orders `current` to `next`: (warm these, may drop these).
pub fn orders(current: &BTreeSet<String>, next: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (next.difference(current).cloned().collect(), current.difference(next).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, zone: &str, fill: f64, free: u64) -> NodeView {
        NodeView {
            name: name.into(),
            labels: BTreeMap::from([("zone".to_string(), zone.to_string()), ("pool".to_string(), "gpu".to_string())]),
            ready: true,
            fill,
            free_cache: free,
        }
    }

    fn policy(max: Option<u32>, spread: bool) -> WarmPolicy {
        WarmPolicy {
            mode: WarmMode::Nodes,
            node_selector: BTreeMap::from([("pool".to_string(), "gpu".to_string())]),
            max_nodes: max,
            spread_by: spread.then(|| "zone".to_string()),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn warm_first_then_free_room_then_spread() {
        let nodes = vec![
            node("a1", "a", 0.0, 100),
            node("a2", "a", 1.0, 10),
            node("a3", "a", 0.0, 500),
            node("b1", "b", 0.5, 10),
            node("b2", "b", 0.0, 900),
        ];
        // One per zone, the warmest of each.
        assert_eq!(place(&policy(Some(2), true), &nodes, &BTreeSet::new()), set(&["a2", "b1"]));
        // Three over two zones: zone a (first by name) gets the second, its most free room.
        assert_eq!(place(&policy(Some(3), true), &nodes, &BTreeSet::new()), set(&["a2", "a3", "b1"]));
        // Without spread: warmest first, then room.
        assert_eq!(place(&policy(Some(3), false), &nodes, &BTreeSet::new()), set(&["a2", "b1", "b2"]));
        // No limit: every eligible node; mode None: none.
        assert_eq!(place(&policy(None, true), &nodes, &BTreeSet::new()).len(), 5);
        let mut off = policy(Some(3), true);
        off.mode = WarmMode::None;
        assert!(place(&off, &nodes, &set(&["a1"])).is_empty());
    }

    #[test]
    fn selector_and_readiness() {
        let mut nodes = vec![node("a1", "a", 1.0, 1), node("a2", "a", 0.0, 1)];
        nodes[0].ready = false;
        nodes[1].labels.insert("pool".into(), "cpu".into());
        assert!(place(&policy(Some(2), true), &nodes, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_lost_node_is_replaced_and_a_shrink_keeps_the_best() {
        let nodes = vec![node("a1", "a", 1.0, 1), node("a2", "a", 0.0, 9), node("b1", "b", 1.0, 1), node("b2", "b", 0.0, 9)];
        let before = place(&policy(Some(2), true), &nodes, &BTreeSet::new());
        assert_eq!(before, set(&["a1", "b1"]));
        // b1 leaves: its zone's other node takes over, a1 stays.
        let after = place(&policy(Some(2), true), &[nodes[0].clone(), nodes[1].clone(), nodes[3].clone()], &before);
        assert_eq!(after, set(&["a1", "b2"]));
        let (warm, drop) = orders(&before, &after);
        assert_eq!((warm, drop), (vec!["b2".to_string()], vec!["b1".to_string()]));
        // The policy shrinks to one: one of those ordered stays.
        let one = place(&policy(Some(1), true), &nodes, &before);
        assert_eq!(one.len(), 1);
        assert!(one.is_subset(&before));
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeView>> {
        prop::collection::vec((0u8..40, 0u8..4, any::<bool>(), any::<bool>(), 0u8..=10, 0u64..1000), 0..30).prop_map(|v| {
            v.into_iter()
                .map(|(id, zone, ready, gpu, fill, free)| {
                    let mut n = node(&format!("n{id}"), &format!("z{zone}"), fill as f64 / 10.0, free);
                    n.ready = ready;
                    if !gpu {
                        n.labels.insert("pool".into(), "cpu".into());
                    }
                    if zone == 3 {
                        n.labels.remove("zone"); // no topology label: a domain of its own
                    }
                    n
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placement_properties(
            nodes in arb_nodes(),
            max in prop::option::of(0u32..12),
            spread in any::<bool>(),
            current_ids in prop::collection::btree_set(0u8..40, 0..10),
            seed in any::<u64>(),
        ) {
            let p = policy(max, spread);
            let current: BTreeSet<String> = current_ids.iter().map(|i| format!("n{i}")).collect();
            let chosen = place(&p, &nodes, &current);
            // As `place` sees them: a name listed twice is its first view.
            let mut elig: BTreeMap<String, &NodeView> = BTreeMap::new();
            for n in nodes.iter().filter(|n| eligible(&p, n)) {
                elig.entry(n.name.clone()).or_insert(n);
            }
            // Never more than N, and as many as can be had.
            let want = max.map_or(elig.len(), |m| (m as usize).min(elig.len()));
            prop_assert_eq!(chosen.len(), want);
            prop_assert!(chosen.iter().all(|c| elig.contains_key(c)));
            // Spread: a domain holds more than one over another only if the other is exhausted.
            if spread {
                let dom = |n: &NodeView| n.labels.get("zone").cloned().unwrap_or_default();
                let mut count: BTreeMap<String, (usize, usize)> = BTreeMap::new();
                for (name, n) in &elig {
                    let e = count.entry(dom(n)).or_default();
                    e.1 += 1;
                    if chosen.contains(name) { e.0 += 1; }
                }
                for (d1, (c1, _)) in &count {
                    for (d2, (c2, t2)) in &count {
                        prop_assert!(*c1 <= c2 + 1 || c2 == t2, "{} has {} chosen, {} has {}", d1, c1, d2, c2);
                    }
                }
            }
            // Stable: the order of the input does not matter, and re-running on the result as
            // the current orders changes nothing.
            let mut shuffled = nodes.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            // Duplicate names keep the first view: compare on inputs without them.
            let unique = nodes.iter().map(|n| &n.name).collect::<BTreeSet<_>>().len() == nodes.len();
            if unique {
                prop_assert_eq!(&place(&p, &shuffled, &current), &chosen);
            }
            prop_assert_eq!(&place(&p, &nodes, &chosen), &chosen);
        }
    }
}
