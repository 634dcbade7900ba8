//! CUDA graphs of the forward body, for decode steps.
//!
//! A decode step is launch-bound at small batches: the body ([`Step::body`]: embedding and
//! every layer) is ~22 launches per layer, each a few microseconds of host work for a few
//! microseconds of device work. Captured once per batch size and replayed, the body is one
//! launch. The head, the uploads and the downloads stay outside the graph.
//!
//! A body captured for one plan replays correctly for another when every launch argument is
//! the same: the scratch buffers (the workspace's generation, see [`GraphCache::sync`]), the
//! pool and the weights (fixed for the backend's life), and the plan's shape. Only steps whose
//! sequences all decode one token are captured ([`GraphKey::of`]); their shape is their row
//! count, and the tokens, slots and row metadata are read from device buffers that
//! [`Step::upload`] fills before each replay.
//!
//! A batch size is captured the second time it is seen, so sizes that come once (a burst of
//! arrivals) cost no capture.
//!
//! A capture or a replay that fails without corrupting the context (a driver without graph
//! support for something the body does) turns graphs off for the backend, with a warning, and
//! the step runs eagerly.

use std::collections::{HashMap, HashSet};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use crate::backend::is_sticky;
use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::forward::Step;
use crate::plan::BatchPlan;

/// Largest decode batch captured (the engine's usual slot counts fit).
pub const GRAPH_MAX_ROWS: usize = 256;

/// Graphs kept at most: one per batch size up to [`GRAPH_MAX_ROWS`], so a server whose batch
/// size wanders never evicts and recaptures. (A graph of ~600 kernel nodes holds well under a
/// megabyte; the least recently used goes first should a caller use larger keys.)
pub const MAX_GRAPHS: usize = GRAPH_MAX_ROWS;

/// The shape a captured body is valid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    rows: usize,
}

impl GraphKey {
    /// The key of a plan whose body may be replayed from a graph: every sequence decodes one
    /// token, and there are at most `max_rows` of them. None for any other plan.
    pub fn of(plan: &BatchPlan, max_rows: usize) -> Option<Self> {
        let rows = plan.rows();
        let decode_only = plan.pre_first.is_empty() && plan.dec_row.len() == rows;
        (rows > 0 && rows <= max_rows && decode_only).then_some(Self { rows })
    }
}

/// Captured bodies by shape, for one backend (generic over the graph type so that its
/// bookkeeping is testable without a device).
#[derive(Debug)]
pub struct GraphCache<G> {
    graphs: HashMap<GraphKey, (G, u64)>,
    /// Shapes seen once and not captured yet.
    seen: HashSet<GraphKey>,
    /// Use counter: each `get` or `insert` stamps its entry.
    clock: u64,
    /// The workspace generation the graphs were captured with.
    generation: u64,
    /// Why graphs were turned off, once they were.
    disabled: Option<String>,
}

impl<G> Default for GraphCache<G> {
    fn default() -> Self {
        Self {
            graphs: HashMap::new(),
            seen: HashSet::new(),
            clock: 0,
            generation: 0,
            disabled: None,
        }
    }
}

impl<G> GraphCache<G> {
    /// Drops every graph when the workspace was reallocated since they were captured: their
    /// launches point into the freed buffers.
    pub fn sync(&mut self, generation: u64) {
        if generation != self.generation {
            self.graphs.clear();
            self.generation = generation;
        }
    }

    pub fn get(&mut self, key: GraphKey) -> Option<&G> {
        self.clock += 1;
        let clock = self.clock;
        self.graphs.get_mut(&key).map(|(g, used)| {
            *used = clock;
            &*g
        })
    }

    /// Whether a shape without a graph should be captured now: the second time it is seen.
    pub fn should_capture(&mut self, key: GraphKey) -> bool {
        !self.seen.insert(key)
    }

    /// Keeps `graph` for `key`, dropping the least recently used graph when full.
    pub fn insert(&mut self, key: GraphKey, graph: G) -> &G {
        if self.graphs.len() >= MAX_GRAPHS && !self.graphs.contains_key(&key) {
            if let Some(oldest) = self
                .graphs
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.graphs.remove(&oldest);
            }
        }
        self.clock += 1;
        &self
            .graphs
            .entry(key)
            .insert_entry((graph, self.clock))
            .into_mut()
            .0
    }

    /// Turns graphs off for good (a capture failed), dropping those kept.
    pub fn disable(&mut self, why: String) {
        self.graphs.clear();
        self.disabled = Some(why);
    }

    pub fn disabled(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}

/// A captured and instantiated body.
pub struct Graph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronized, but may be used from any thread
// when calls on one graph are serialized (CUDA driver API, "Graph object thread safety"). A
// `Graph` lives in the `GraphCache` of one backend and is only reached through `&mut` access
// to that backend, so no two threads ever call on it at once.
unsafe impl Send for Graph {}

/// Whether graphs are used at all (`CudaOptions::graphs`), and for which steps.
#[derive(Clone, Copy, Debug)]
pub struct GraphPolicy {
    pub enabled: bool,
    pub max_rows: usize,
}

/// What captures and replays bodies: the device's compute stream ([`StreamRecorder`]), or a
/// stand-in in tests (the kernel emulator records launches instead of running them).
pub trait Recorder {
    type Graph;
    /// Captures what `issue` queues, without running it.
    fn capture(&self, issue: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Runs a captured graph.
    fn launch(&self, graph: &Self::Graph) -> Result<()>;
}

/// Captures on a device's compute stream.
pub struct StreamRecorder<'a>(pub &'a Device);

impl Recorder for StreamRecorder<'_> {
    type Graph = Graph;

    /// The capture is local to this thread, so work other threads issue meanwhile (a swap on
    /// the copy stream) is neither captured nor refused.
    fn capture(&self, issue: &mut dyn FnMut() -> Result<()>) -> Result<Graph> {
        let stream = &self.0.compute;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("begin graph capture"))?;
        let issued = issue();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(CudaError::driver("end graph capture"));
        issued?;
        ended?
            .map(Graph)
            .ok_or_else(|| CudaError::Unsupported("graph capture returned no graph".into()))
    }

    fn launch(&self, graph: &Graph) -> Result<()> {
        graph.0.launch().map_err(CudaError::driver("launch graph"))
    }
}

/// Runs `step`'s body for `plan` (already uploaded): replayed from a graph where the plan's
/// shape allows one (captured the second time the shape is seen), else issued launch by
/// launch.
pub fn run_body<R: Recorder>(
    cache: &mut GraphCache<R::Graph>,
    policy: GraphPolicy,
    generation: u64,
    recorder: &R,
    step: &Step<'_>,
    plan: &BatchPlan,
) -> Result<()> {
    let key = match GraphKey::of(plan, policy.max_rows) {
        Some(key) if policy.enabled && !step.part.reduce && cache.disabled().is_none() => key,
        _ => return step.body(plan),
    };
    cache.sync(generation);
    if cache.get(key).is_none() {
        if !cache.should_capture(key) {
            return step.body(plan);
        }
        match recorder.capture(&mut || step.body(plan)) {
            Ok(graph) => {
                cache.insert(key, graph);
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "capturing a CUDA graph failed; CUDA graphs are off for this backend"
                );
                cache.disable(e.to_string());
                return step.body(plan);
            }
        }
    }
    let Some(graph) = cache.get(key) else {
        return step.body(plan);
    };
    match recorder.launch(graph) {
        Ok(()) => Ok(()),
        // A launch that fails without corrupting the context ran nothing: turn graphs off and
        // run this step eagerly rather than fail every decode step from now on.
        Err(e) if !is_sticky(&e) => {
            tracing::warn!(
                error = %e,
                "launching a CUDA graph failed; CUDA graphs are off for this backend"
            );
            cache.disable(e.to_string());
            step.body(plan)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::step;
    use rwkv_model::OutputRows;

    fn plan(lens: &[usize]) -> BatchPlan {
        let tokens: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        let steps: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(slot, t)| step(slot, t, OutputRows::Last))
            .collect();
        BatchPlan::new(&steps).unwrap()
    }

    #[test]
    fn only_decode_steps_within_the_limit_have_a_key() {
        assert_eq!(GraphKey::of(&plan(&[1]), 256), Some(GraphKey { rows: 1 }));
        assert_eq!(
            GraphKey::of(&plan(&[1, 1, 1]), 256),
            Some(GraphKey { rows: 3 })
        );
        // A prefill row changes the launches (the prefill kernel, its sequence count).
        assert_eq!(GraphKey::of(&plan(&[1, 2]), 256), None);
        assert_eq!(GraphKey::of(&plan(&[4]), 256), None);
        // Sequences without tokens add no rows and change nothing.
        assert_eq!(
            GraphKey::of(&plan(&[1, 0, 1]), 256),
            Some(GraphKey { rows: 2 })
        );
        assert_eq!(GraphKey::of(&plan(&[1, 1, 1]), 2), None);
        assert_eq!(GraphKey::of(&plan(&[]), 256), None);
        assert_eq!(GraphKey::of(&plan(&[0]), 256), None);
    }

    #[test]
    fn same_shape_same_key_whatever_the_slots_and_outputs() {
        let a = [7u32];
        let b = [9u32];
        let one = BatchPlan::new(&[step(3, &a, OutputRows::Last)]).unwrap();
        let other = BatchPlan::new(&[step(5, &b, OutputRows::Top(4))]).unwrap();
        assert_eq!(GraphKey::of(&one, 8), GraphKey::of(&other, 8));
        // What the body reads from the metadata sits at the same offsets.
        let (lo, lt) = (one.layout(), other.layout());
        assert_eq!(
            (&lo.row_prev, &lo.row_last, &lo.dec_row, &lo.dec_slot),
            (&lt.row_prev, &lt.row_last, &lt.dec_row, &lt.dec_slot)
        );
    }

    #[test]
    fn the_cache_drops_stale_and_least_recently_used_graphs() {
        let key = |rows| GraphKey { rows };
        let mut cache = GraphCache::<usize>::default();
        cache.sync(0);
        assert_eq!(*cache.insert(key(1), 10), 10);
        assert_eq!(cache.get(key(1)), Some(&10));
        assert_eq!(cache.get(key(2)), None);
        // Captured the second time a shape is seen.
        assert!(!cache.should_capture(key(2)));
        assert!(cache.should_capture(key(2)));
        // Same generation: kept. A reallocated workspace: dropped.
        cache.sync(0);
        assert_eq!(cache.len(), 1);
        cache.sync(1);
        assert!(cache.is_empty());

        for rows in 1..=MAX_GRAPHS {
            cache.insert(key(rows), rows);
        }
        // One graph per batch size fits without eviction.
        assert_eq!(cache.get(key(GRAPH_MAX_ROWS)), Some(&GRAPH_MAX_ROWS));
        assert_eq!(cache.get(key(1)), Some(&1));
        assert_eq!(cache.len(), MAX_GRAPHS);
        // Using the oldest makes the second oldest the one to go.
        assert_eq!(cache.get(key(1)), Some(&1));
        cache.insert(key(MAX_GRAPHS + 1), 0);
        assert_eq!(cache.len(), MAX_GRAPHS);
        assert_eq!(cache.get(key(2)), None);
        assert_eq!(cache.get(key(1)), Some(&1));
        // Replacing a kept key evicts nothing.
        cache.insert(key(1), 11);
        assert_eq!(cache.len(), MAX_GRAPHS);
        assert_eq!(cache.get(key(1)), Some(&11));

        cache.disable("no graphs here".into());
        assert!(cache.is_empty());
        assert_eq!(cache.disabled(), Some("no graphs here"));
    }
}
