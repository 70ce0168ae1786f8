//! Faults: partitions, crashes, restarts and pauses, random or scripted.

use super::*;

impl World {
    // --- Faults ----------------------------------------------------------------------

    pub(super) fn inject_faults(&mut self) {
        let now = self.now;
        let faults = self.options.faults.clone();
        let nodes = self.node_count();
        if faults.partition.sample(&mut self.fault_rng) {
            let (a, b) = if faults.partition_servers.sample(&mut self.fault_rng) {
                (PRIMARY, BACKUP)
            } else {
                let a = self.fault_rng.random_range(0..nodes);
                let mut b = self.fault_rng.random_range(0..nodes - 1);
                if b >= a {
                    b += 1;
                }
                (a, b)
            };
            let kind = if faults.partition_breaks.sample(&mut self.fault_rng) {
                PartitionKind::Break
            } else {
                PartitionKind::Stall
            };
            let one_way = faults.partition_one_way.sample(&mut self.fault_rng);
            let duration = random_duration(&mut self.fault_rng, faults.partition_duration_max);
            self.network.partition(now, a, b, kind, one_way);
            self.heals.insert((now + duration, a, b), ());
            let name = match (kind, one_way) {
                (PartitionKind::Break, _) => "partition_break",
                (PartitionKind::Stall, true) => "partition_stall_one_way",
                (PartitionKind::Stall, false) => "partition_stall",
            };
            *self.coverage.faults.entry(name).or_default() += 1;
            self.trace(
                || format!("partition {a} {b} {kind:?} one_way={one_way} for {duration:?}"),
                &(6u8, a, b),
            );
        }
        for node in 0..nodes {
            let crash = if World::is_server(node) {
                faults.server_crash
            } else {
                faults.client_crash
            };
            if self.is_up(node) && crash.sample(&mut self.fault_rng) {
                let delay = random_duration(&mut self.fault_rng, faults.restart_delay_max);
                self.crash(node, now + delay);
            }
            let pausable =
                self.is_up(node) && self.life(node).is_some_and(|life| !life.is_paused());
            if pausable && faults.pause.sample(&mut self.fault_rng) {
                let duration = random_duration(&mut self.fault_rng, faults.pause_duration_max);
                if let Some(life) = self.life_mut(node) {
                    life.paused_until = Some(now + duration);
                }
                *self
                    .coverage
                    .faults
                    .entry(if World::is_server(node) {
                        "server_pause"
                    } else {
                        "client_pause"
                    })
                    .or_default() += 1;
                self.trace(|| format!("pause {node} for {duration:?}"), &(7u8, node));
            }
        }
    }

    pub(super) fn crash(&mut self, node: NodeId, restart_at: Instant) {
        let now = self.now;
        self.network.crash(now, node);
        if World::is_server(node) {
            if let Some(slot) = self.servers.get_mut(node) {
                slot.machine = None;
                slot.ready_streams.clear();
                slot.active_since = None;
            }
            self.model.server_crashed(node);
            *self.coverage.faults.entry("server_crash").or_default() += 1;
        } else {
            if let Some(slot) = self.client_slot(node) {
                slot.machine = None;
            }
            *self.coverage.faults.entry("client_crash").or_default() += 1;
        }
        if let Some(life) = self.life_mut(node) {
            life.restart_at = Some(restart_at);
            life.paused_until = None;
            life.held.clear();
        }
        self.trace(|| format!("crash {node}"), &(8u8, node));
    }

    pub(super) fn restarts_and_resumes(&mut self) {
        let now = self.now;
        for node in 0..self.node_count() {
            let Some(life) = self.life(node) else {
                continue;
            };
            if life.restart_at.is_some_and(|at| at <= now) {
                if let Some(life) = self.life_mut(node) {
                    life.restart_at = None;
                    life.incarnation += 1;
                    life.running_since = now;
                }
                self.network.restart(now, node);
                self.trace(|| format!("restart {node}"), &(9u8, node));
                if World::is_server(node) {
                    self.start_server(node);
                } else {
                    self.start_client(node);
                }
            } else if life.paused_until.is_some_and(|at| at <= now) {
                let held = match self.life_mut(node) {
                    Some(life) => {
                        life.paused_until = None;
                        life.running_since = now;
                        std::mem::take(&mut life.held)
                    }
                    None => continue,
                };
                self.trace(|| format!("resume {node}"), &(10u8, node));
                for item in held {
                    match item {
                        Held::Delivery(delivery, sender) => self.deliver_sent_by(delivery, sender),
                        Held::Notice(server, link, notice) => {
                            self.report_notice(node, server, link, notice)
                        }
                    }
                }
            }
        }
    }

    /// What libzmq's socket monitor tells the production host about `client`'s SUB to
    /// `server` (`Link::Updates`; for a server, its SUB to the peer's publisher) or the
    /// client's DEALER to it (`Link::SnapshotReply`).
    pub(super) fn report_notice(
        &mut self,
        client: NodeId,
        server: NodeId,
        link: Link,
        notice: Notice,
    ) {
        match notice {
            Notice::Reconnected => self.report_reconnect(client, server, link),
            Notice::Disconnected => self.report_disconnect(client, server),
        }
    }

    /// A subscription to `server`'s publisher took effect (its host's XPUB sees it).
    pub(super) fn report_join(&mut self, server: NodeId) {
        if !World::is_server(server) || self.life(server).is_none_or(Life::is_paused) {
            return;
        }
        let Some(slot) = self.servers.get_mut(server) else {
            return;
        };
        let (local, wall) = (
            slot.life.clock.local(self.now),
            slot.life.clock.wall(self.now),
        );
        let Some(machine) = slot.machine.as_mut() else {
            return;
        };
        machine.handle_subscriber_joined(local, wall);
        self.after_server_step(server);
    }

    /// A client's connection to `server` went down (servers take no such notice).
    pub(super) fn report_disconnect(&mut self, client: NodeId, server: NodeId) {
        if World::is_server(client) {
            return;
        }
        let Some(local) = self.life(client).map(|life| life.clock.local(self.now)) else {
            return;
        };
        if let Some(machine) = self
            .client_slot(client)
            .and_then(|slot| slot.machine.as_mut())
        {
            machine.handle_server_disconnected(local, server_index(server));
        }
        self.drain_client(client);
    }

    pub(super) fn report_reconnect(&mut self, client: NodeId, server: NodeId, link: Link) {
        let now = self.now;
        if World::is_server(client) {
            let Some(slot) = self.servers.get_mut(client) else {
                return;
            };
            let (local, wall) = (slot.life.clock.local(now), slot.life.clock.wall(now));
            let mut still_syncing = false;
            if let Some(machine) = slot.machine.as_mut() {
                machine.handle_peer_publisher_reconnected(local, wall);
                still_syncing = machine.is_syncing();
            }
            if still_syncing {
                // What it buffers from now on comes from the peer as it is now.
                let peer_incarnation = self.life(server).map(|life| life.incarnation);
                if let Some(slot) = self.servers.get_mut(client) {
                    slot.syncing_with = peer_incarnation;
                }
            }
            self.after_server_step(client);
            return;
        }
        let Some(local) = self.life(client).map(|life| life.clock.local(now)) else {
            return;
        };
        if let Some(machine) = self
            .client_slot(client)
            .and_then(|slot| slot.machine.as_mut())
        {
            if link == Link::SnapshotReply {
                machine.handle_snapshot_reconnected(local, server_index(server));
            } else {
                machine.handle_subscriber_reconnected(local, server_index(server));
            }
        }
        self.drain_client(client);
    }

    pub(super) fn run_script(&mut self) {
        let now = self.now;
        while let Some((&(at, order), _)) = self.script.first_key_value() {
            if at > now {
                break;
            }
            let Some(step) = self.script.remove(&(at, order)) else {
                break;
            };
            self.trace(|| format!("script {step:?}"), &(14u8, order));
            match step {
                Scripted::Write { client, operation } => self.write(client, operation),
                Scripted::Crash(node) => {
                    if self.is_up(node) {
                        // Down until restarted; the heal phase restarts it at the latest.
                        self.crash(node, Instant::from_nanos(u64::MAX));
                    }
                }
                Scripted::Restart(node) => {
                    if let Some(life) = self.life_mut(node) {
                        if life.restart_at.is_some() {
                            life.restart_at = Some(now);
                        }
                    }
                    self.restarts_and_resumes();
                }
                Scripted::Partition {
                    a,
                    b,
                    kind,
                    one_way,
                } => self.network.partition(now, a, b, kind, one_way),
                Scripted::Heal { a, b } => self.network.heal(now, a, b),
                Scripted::StallRoute(route) => self.network.stall_route(route),
                Scripted::ReleaseRoute(route) => self.network.release_route(now, route),
                Scripted::ReleaseRouteNewestFirst(route) => {
                    self.network.release_route_newest_first(now, route);
                }
                Scripted::Pause { node, duration } => {
                    if let Some(life) = self.life_mut(node) {
                        if life.restart_at.is_none() {
                            life.paused_until = Some(now + duration);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn heal_partitions_due(&mut self) {
        let now = self.now;
        while let Some((&(at, a, b), _)) = self.heals.first_key_value() {
            if at > now {
                break;
            }
            self.heals.remove(&(at, a, b));
            self.network.heal(now, a, b);
            self.trace(|| format!("heal {a} {b}"), &(11u8, a, b));
        }
    }

    pub(super) fn begin_healing(&mut self) {
        let now = self.now;
        self.phase = Phase::Healing;
        self.workload.stop();
        self.heals.clear();
        self.network.heal_all(now);
        for node in 0..self.node_count() {
            if let Some(life) = self.life_mut(node) {
                if life.restart_at.is_some() {
                    life.restart_at = Some(now);
                }
                if life.paused_until.is_some() {
                    life.paused_until = Some(now);
                }
            }
        }
        self.trace(|| "heal phase".to_string(), &12u8);
    }
}
