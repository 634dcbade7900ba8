//! Weighted fair ordering of the requests that wait for a worker, per model.
//!
//! Start-time fair queueing: each tenant's next request is tagged `max(V, last tag of that
//! tenant) + 1/weight`, where `V` is the tag of the request served last; waiters are served in
//! tag order. A tenant that floods the queue therefore only delays itself: another tenant's
//! request is tagged near `V` and goes ahead of the flood's tail, so its wait is bounded by the
//! number of tenants waiting, not by the length of the queue.

use std::collections::{BTreeSet, HashMap};

/// Tag units per request of a weight-1 tenant.
const UNIT: u64 = 1 << 20;

/// A waiting request's place: its tag and a sequence number that breaks ties in arrival order.
pub type Ticket = (u64, u64);

#[derive(Debug, Default)]
pub struct FairQueue {
    waiting: BTreeSet<Ticket>,
    /// Tag of the request served last (`V`).
    served: u64,
    /// Last tag given to each tenant.
    last: HashMap<String, u64>,
    next_seq: u64,
}

impl FairQueue {
    /// Places a request of `tenant` (weight >= 1) in the queue.
    pub fn push(&mut self, tenant: &str, weight: u32) -> Ticket {
        let start = self.served.max(self.last.get(tenant).copied().unwrap_or(0));
        let tag = start + UNIT / u64::from(weight.max(1));
        self.last.insert(tenant.to_owned(), tag);
        let ticket = (tag, self.next_seq);
        self.next_seq += 1;
        self.waiting.insert(ticket);
        ticket
    }

    /// True if `ticket` is the next to be served.
    pub fn is_first(&self, ticket: Ticket) -> bool {
        self.waiting.first() == Some(&ticket)
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The request was served: it leaves the queue and advances `V`.
    pub fn served(&mut self, ticket: Ticket) {
        if self.waiting.remove(&ticket) {
            self.served = self.served.max(ticket.0);
        }
        self.forget_idle_tenants();
    }

    /// The request left without being served (timeout, client gone).
    pub fn leave(&mut self, ticket: Ticket) {
        self.waiting.remove(&ticket);
        self.forget_idle_tenants();
    }

    /// Tenants whose last tag is behind `V` gain nothing from being remembered; dropping them
    /// keeps the map as small as the set of active tenants.
    fn forget_idle_tenants(&mut self) {
        if self.last.len() > 1024 {
            let v = self.served;
            self.last.retain(|_, tag| *tag > v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_all(q: &mut FairQueue, mut tickets: Vec<(&'static str, Ticket)>) -> Vec<&'static str> {
        let mut order = Vec::new();
        while !tickets.is_empty() {
            let i = tickets.iter().position(|(_, t)| q.is_first(*t)).unwrap();
            let (who, t) = tickets.remove(i);
            q.served(t);
            order.push(who);
        }
        order
    }

    #[test]
    fn a_late_tenant_goes_ahead_of_a_flood() {
        let mut q = FairQueue::default();
        let mut tickets: Vec<_> = (0..10).map(|_| ("flood", q.push("flood", 1))).collect();
        tickets.push(("quiet", q.push("quiet", 1)));
        let order = serve_all(&mut q, tickets);
        let pos = order.iter().position(|&w| w == "quiet").unwrap();
        assert!(
            pos <= 1,
            "quiet waited behind {pos} flood requests: {order:?}"
        );
    }

    #[test]
    fn weights_share_the_service_in_proportion() {
        let mut q = FairQueue::default();
        let mut tickets = Vec::new();
        for _ in 0..30 {
            tickets.push(("heavy", q.push("heavy", 2)));
            tickets.push(("light", q.push("light", 1)));
        }
        let first = &serve_all(&mut q, tickets)[..30];
        let heavy = first.iter().filter(|&&w| w == "heavy").count();
        assert!(
            (19..=21).contains(&heavy),
            "{heavy} of the first 30 went to weight 2"
        );
    }

    #[test]
    fn one_tenant_alone_is_served_in_arrival_order() {
        let mut q = FairQueue::default();
        let a = q.push("a", 1);
        let b = q.push("a", 1);
        assert!(q.is_first(a) && !q.is_first(b));
        q.leave(a);
        assert!(q.is_first(b));
    }
}
