//! The Redis Streams [`Bus`] for the fleet.
//!
//! Commands map one to one: XADD (after an XINFO GROUPS backlog check), XGROUP
//! CREATE … MKSTREAM, XREADGROUP (blocking reads on their own connection, so a
//! wait never stalls the shared multiplexed one), XACK, XPENDING + XCLAIM for
//! stale entries (XPENDING gives the delivery counts that decide dead-lettering),
//! and XRANGE with an exclusive start for resumable logs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{Client, Script, Value};

use crate::codec::BusError;
use crate::stream::{Bus, Entry, EntryId, Fields, Holder, Lease, StreamLimits, reserve_fraction};

/// Appends unless the key was seen: KEYS = stream, its key record; ARGV = key,
/// ttl ms, then field/value pairs. Atomic, so a redelivered result never lands twice.
const ADD_UNIQUE: &str = r"
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then return {prev, 0} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {id, 1}
";

/// KEYS = stream; ARGV = group, then the ids to acknowledge. Acknowledges, then
/// trims every entry that each group of the stream has acknowledged: below the
/// oldest pending entry of each group, and at most up to what it was delivered.
const ACK_TRIM: &str = r"
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
if redis.call('EXISTS', KEYS[1]) == 0 then return n end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq), ms}
end
local function less(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local p = redis.call('XPENDING', KEYS[1], name)
  local c
  if tonumber(p[1]) > 0 then
    c = parse(p[2])
  else
    c = parse(last)
    c[2] = c[2] + 1
  end
  if floor == nil or less(c, floor) then floor = c end
end
if floor then
  redis.call('XTRIM', KEYS[1], 'MINID', floor[3] .. '-' .. string.format('%d', floor[2]))
end
return n
";

/// KEYS = records; ARGV = ttl ms, then their values. Writes all unless the
/// first exists; returns the first's value when it did.
const PUT_ALL_NEW: &str = r"
local prev = redis.call('GET', KEYS[1])
if prev then return {prev} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
end
return {}
";

/// KEYS = record; ARGV = expected value, new value (empty: delete), ttl ms.
/// Compare-and-set: 1 when the record held the expected value.
const PUT_IF: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
";

/// KEYS = nodes hash; ARGV = node, slots, ttl ms. Deadlines use the server's clock.
const ADVERTISE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
return 1
";

/// KEYS = nodes hash, leases zset; ARGV = holder (tenant, unit separator,
/// id), ttl ms, tenant, reserved slots. Returns {granted (1), full (0), no
/// capacity (-1) or over the tenant's share (2), capacity, used, held, tenants}.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = 0
local nodes = redis.call('HGETALL', KEYS[1])
for i = 1, #nodes, 2 do
  local slots, untl = string.match(nodes[i + 1], '^(%d+):(%d+)$')
  if slots and tonumber(untl) > now then
    cap = cap + tonumber(slots)
  else
    redis.call('HDEL', KEYS[1], nodes[i])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local used = redis.call('ZCARD', KEYS[2])
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  if cap == 0 then return {-1, 0, used} end
  if used >= cap then return {0, cap, used} end
  if cap - used <= math.ceil(cap * tonumber(ARGV[4])) then
    local held, active, seen = 0, 0, {}
    for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
      local tenant = string.match(m, '^(.-)\31') or ''
      if not seen[tenant] then seen[tenant] = true; active = active + 1 end
      if tenant == ARGV[3] then held = held + 1 end
    end
    if held == 0 then active = active + 1 end
    if held * (active + 1) >= cap then return {2, cap, used, held, active} end
  end
  used = used + 1
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return {1, cap, used}
";

/// KEYS = nodes hash, leases zset. Returns {used, capacity}, read-only.
const USAGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = 0
local nodes = redis.call('HGETALL', KEYS[1])
for i = 1, #nodes, 2 do
  local slots, untl = string.match(nodes[i + 1], '^(%d+):(%d+)$')
  if slots and tonumber(untl) > now then cap = cap + tonumber(slots) end
end
return {redis.call('ZCOUNT', KEYS[2], now, '+inf'), cap}
";

/// Streams in a Redis server.
#[derive(Clone)]
pub struct RedisBus {
    client: Client,
    conn: ConnectionManager,
    /// Connections for blocking reads, reused: a blocked command holds its
    /// connection, so it never shares the multiplexed one.
    blocking: Arc<Mutex<Vec<MultiplexedConnection>>>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    ack_trim: Script,
    put_all_new: Script,
    put_if: Script,
    add_unique: Script,
    advertise: Script,
    lease: Script,
    usage: Script,
}

/// Idle blocking connections kept for reuse.
const BLOCKING_POOL: usize = 256;

/// How much longer than its BLOCK a blocking read may take before it counts as lost.
const BLOCK_MARGIN: Duration = Duration::from_secs(2);

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus").finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    bytes(v)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other).parse().ok(),
    }
}

/// `[id, [field, value, …]]` entries.
fn entries(v: &Value) -> Result<Vec<(EntryId, Fields)>, BusError> {
    let Value::Array(items) = v else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(pair) = item else { continue };
        let [id, Value::Array(kv)] = pair.as_slice() else {
            continue;
        };
        let id: EntryId = text(id).parse()?;
        let fields = kv
            .chunks_exact(2)
            .filter_map(|c| {
                Some((
                    String::from_utf8_lossy(bytes(&c[0])?).into_owned(),
                    bytes(&c[1])?.to_vec(),
                ))
            })
            .collect();
        out.push((id, fields));
    }
    Ok(out)
}

/// Entries of an XREAD/XREADGROUP reply (RESP2 arrays or RESP3 maps of streams),
/// each marked with `deliveries`.
fn read_reply(reply: Value, deliveries: u32) -> Result<Vec<Entry>, BusError> {
    let streams = match reply {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for s in streams {
        if let Value::Array(pair) = s
            && let [_, list] = pair.as_slice()
        {
            out.extend(entries(list)?.into_iter().map(|(id, fields)| Entry {
                id,
                fields,
                deliveries,
            }));
        }
    }
    Ok(out)
}

impl RedisBus {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`).
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        let client = Client::open(url).map_err(|e| BusError::Unavailable(format!("{url}: {e}")))?;
        let conn = ConnectionManager::new(client.clone())
            .await
            .map_err(unavailable)?;
        Ok(Self {
            client,
            conn,
            blocking: Arc::default(),
            scripts: Arc::new(Scripts {
                ack_trim: Script::new(ACK_TRIM),
                put_all_new: Script::new(PUT_ALL_NEW),
                put_if: Script::new(PUT_IF),
                add_unique: Script::new(ADD_UNIQUE),
                advertise: Script::new(ADVERTISE),
                lease: Script::new(LEASE),
                usage: Script::new(USAGE),
            }),
        })
    }

    /// Runs a command that blocks on the server for up to `block` on a
    /// connection of its own, reused afterwards unless the command failed (the
    /// connection may be broken). These connections have no client-side
    /// response timeout (the client's default of 500 ms would cut every longer
    /// BLOCK short and leave the server still blocked on the connection); the
    /// whole call is bounded by `block` plus a margin instead.
    async fn blocking_query(&self, cmd: &redis::Cmd, block: Duration) -> redis::RedisResult<Value> {
        let idle = self
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut conn = match idle {
            Some(c) => c,
            None => {
                let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?
            }
        };
        let r = match tokio::time::timeout(block + BLOCK_MARGIN, cmd.query_async(&mut conn)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no reply to a blocking read in time",
            ))),
        };
        if r.is_ok() {
            let mut pool = self.blocking.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < BLOCKING_POOL {
                pool.push(conn);
            }
        }
        r
    }

    /// [`PUT_IF`]: while `key` holds `expect`, replaces it with `then` (value
    /// and TTL) or deletes it (`None`); whether it did.
    async fn compare_and_set(
        &self,
        key: &str,
        expect: &[u8],
        then: Option<(Vec<u8>, Duration)>,
    ) -> Result<bool, BusError> {
        let (value, ttl) = match then {
            Some((v, ttl)) => (v, (ttl.as_millis().max(1) as u64).to_string()),
            None => (Vec::new(), String::new()),
        };
        let mut conn = self.conn.clone();
        let done: i64 = self
            .scripts
            .put_if
            .key(key)
            .arg(expect)
            .arg(value)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    async fn group_infos(&self, stream: &str) -> Result<Vec<crate::GroupInfo>, BusError> {
        let mut conn = self.conn.clone();
        let reply: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            // No such stream yet: nothing is behind.
            Err(e) if e.to_string().contains("no such key") => return Ok(Vec::new()),
            Err(e) => return Err(unavailable(e)),
        };
        let Value::Array(groups) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for g in groups {
            let pairs: Vec<(String, Value)> = match g {
                Value::Array(kv) => kv
                    .chunks_exact(2)
                    .map(|c| (text(&c[0]), c[1].clone()))
                    .collect(),
                Value::Map(kv) => kv.into_iter().map(|(k, v)| (text(&k), v)).collect(),
                _ => continue,
            };
            let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            out.push(crate::GroupInfo {
                name: get("name").map(|v| text(&v)).unwrap_or_default(),
                pending: get("pending").as_ref().and_then(int).unwrap_or(0).max(0) as usize,
                // Entries not yet delivered; Redis reports nil when it cannot tell.
                lag: get("lag").as_ref().and_then(int).unwrap_or(0).max(0) as usize,
            });
        }
        Ok(out)
    }

    /// The group furthest behind (pending plus undelivered).
    async fn backlog(&self, stream: &str) -> Result<Option<(String, usize)>, BusError> {
        Ok(self
            .group_infos(stream)
            .await?
            .into_iter()
            .map(|g| (g.name, g.pending + g.lag))
            .max_by_key(|(_, behind)| *behind))
    }
}

impl Bus for RedisBus {
    async fn groups(&self, stream: &str) -> Result<Vec<crate::GroupInfo>, BusError> {
        let mut g = self.group_infos(stream).await?;
        g.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(g)
    }

    async fn add(
        &self,
        stream: &str,
        fields: Fields,
        limits: StreamLimits,
    ) -> Result<EntryId, BusError> {
        if let Some((group, behind)) = self.backlog(stream).await?
            && behind >= limits.max_backlog
        {
            return Err(BusError::Full {
                stream: stream.to_owned(),
                group,
                backlog: behind,
            });
        }
        let mut cmd = redis::cmd("XADD");
        // Acknowledged history is trimmed; the backlog check above keeps unacknowledged entries within reach.
        cmd.arg(stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(limits.max_backlog.saturating_mul(4))
            .arg("*");
        for (k, v) in &fields {
            cmd.arg(k.as_str()).arg(v.as_slice());
        }
        let mut conn = self.conn.clone();
        let id: String = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        id.parse()
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(stream).arg(">");
        let reply: redis::RedisResult<Value> = if block.is_zero() {
            let mut conn = self.conn.clone();
            cmd.query_async(&mut conn).await
        } else {
            self.blocking_query(&cmd, block).await
        };
        let reply = match reply {
            Ok(v) => v,
            Err(e) if e.to_string().contains("NOGROUP") => {
                return Err(BusError::NoGroup(format!("{stream}/{group}")));
            }
            Err(e) => return Err(unavailable(e)),
        };
        read_reply(reply, 1)
    }

    async fn len(&self, stream: &str) -> Result<usize, BusError> {
        let mut conn = self.conn.clone();
        let n: i64 = redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n.max(0) as usize)
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[EntryId]) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut inv = self.scripts.ack_trim.key(stream);
        inv.arg(group);
        for id in ids {
            inv.arg(id.to_string());
        }
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = inv.invoke_async(&mut conn).await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("NOGROUP") => {
                Err(BusError::NoGroup(format!("{stream}/{group}")))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn claim_stale(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
        limits: StreamLimits,
        dead_letter: &str,
    ) -> Result<Vec<Entry>, BusError> {
        let idle_ms = min_idle.as_millis() as u64;
        let mut conn = self.conn.clone();
        let pending: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("-")
            .arg("+")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(rows) = pending else {
            return Ok(Vec::new());
        };
        let mut claim = Vec::new();
        let mut dead = Vec::new();
        for row in rows {
            let Value::Array(r) = row else { continue };
            let (Some(id), Some(n)) = (r.first().map(text), r.get(3).and_then(int)) else {
                continue;
            };
            let id: EntryId = id.parse()?;
            if n >= i64::from(limits.max_deliveries) {
                dead.push(id);
            } else {
                claim.push((id, n as u32));
            }
        }
        for id in dead {
            let found: Value = redis::cmd("XRANGE")
                .arg(stream)
                .arg(id.to_string())
                .arg(id.to_string())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if let Some((_, mut fields)) = entries(&found)?.into_iter().next() {
                fields.insert(
                    "dead.from".into(),
                    format!("{stream}/{group}/{id}").into_bytes(),
                );
                let mut cmd = redis::cmd("XADD");
                cmd.arg(dead_letter)
                    .arg("MAXLEN")
                    .arg(crate::stream::MAX_DEAD_LETTERS)
                    .arg("*");
                for (k, v) in &fields {
                    cmd.arg(k.as_str()).arg(v.as_slice());
                }
                let _: String = cmd.query_async(&mut conn).await.map_err(unavailable)?;
            }
            self.ack(stream, group, &[id]).await?;
        }
        if claim.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(stream).arg(group).arg(consumer).arg(idle_ms);
        for (id, _) in &claim {
            cmd.arg(id.to_string());
        }
        let claimed: Value = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(entries(&claimed)?
            .into_iter()
            .map(|(id, fields)| Entry {
                deliveries: claim
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map_or(1, |(_, n)| n + 1),
                id,
                fields,
            })
            .collect())
    }

    async fn range_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        let start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(entries(&reply)?
            .into_iter()
            .map(|(id, fields)| Entry {
                id,
                fields,
                deliveries: 0,
            })
            .collect())
    }

    async fn add_unique(
        &self,
        stream: &str,
        unique: &str,
        fields: Fields,
        ttl: Duration,
    ) -> Result<(EntryId, bool), BusError> {
        let mut inv = self.scripts.add_unique.prepare_invoke();
        inv.key(stream)
            .key(format!("{stream}:unique"))
            .arg(unique)
            .arg(ttl.as_millis().max(1) as u64);
        for (k, v) in &fields {
            inv.arg(k.as_str()).arg(v.as_slice());
        }
        let mut conn = self.conn.clone();
        let reply: Value = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        match reply {
            Value::Array(v) if v.len() == 2 => Ok((text(&v[0]).parse()?, int(&v[1]) == Some(1))),
            other => Err(BusError::Unavailable(format!(
                "unexpected reply to an idempotent append: {other:?}"
            ))),
        }
    }

    async fn read_after(
        &self,
        stream: &str,
        after: Option<EntryId>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        if block.is_zero() {
            return self.range_after(stream, after, count).await;
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(stream)
            .arg(after.unwrap_or_default().to_string());
        let reply = self
            .blocking_query(&cmd, block)
            .await
            .map_err(unavailable)?;
        read_reply(reply, 0)
    }

    async fn advertise(
        &self,
        pool: &str,
        node: &str,
        slots: u32,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let _: Value = self
            .scripts
            .advertise
            .key(format!("{pool}:nodes"))
            .arg(node)
            .arg(slots)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn lease(
        &self,
        pool: &str,
        holder: Holder<'_>,
        ttl: Duration,
        reserve: f32,
    ) -> Result<Lease, BusError> {
        let mut conn = self.conn.clone();
        let r = reserve_fraction(reserve);
        let reply: Value = self
            .scripts
            .lease
            .key(format!("{pool}:nodes"))
            .key(format!("{pool}:leases"))
            .arg(holder.member())
            .arg(ttl.as_millis().max(1) as u64)
            .arg(holder.tenant)
            .arg(format!("{r}"))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(v) = reply else {
            return Err(BusError::Unavailable(format!(
                "unexpected reply to a lease: {reply:?}"
            )));
        };
        let n = |i: usize| v.get(i).and_then(int).unwrap_or(0);
        Ok(match n(0) {
            1 => Lease::Granted {
                capacity: n(1) as u32,
                used: n(2) as u32,
            },
            0 => Lease::Full {
                capacity: n(1) as u32,
            },
            2 => Lease::OverShare {
                capacity: n(1) as u32,
                held: n(3) as u32,
                tenants: n(4) as u32,
            },
            _ => Lease::NoCapacity,
        })
    }

    async fn pool_usage(&self, pool: &str) -> Result<(u32, u32), BusError> {
        let mut conn = self.conn.clone();
        let reply: Value = self
            .scripts
            .usage
            .key(format!("{pool}:nodes"))
            .key(format!("{pool}:leases"))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Value::Array(v) = reply else {
            return Err(BusError::Unavailable(format!(
                "unexpected reply to a pool query: {reply:?}"
            )));
        };
        let n = |i: usize| v.get(i).and_then(int).unwrap_or(0) as u32;
        Ok((n(0), n(1)))
    }

    async fn release(&self, pool: &str, holder: Holder<'_>) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("ZREM")
            .arg(format!("{pool}:leases"))
            .arg(holder.member())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn touch(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[EntryId],
    ) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        // Min-idle 0 claims to ourselves and resets the idle time; JUSTID
        // leaves the delivery counter alone.
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(stream).arg(group).arg(consumer).arg(0);
        for id in ids {
            cmd.arg(id.to_string());
        }
        let _: Value = cmd
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let _: Value = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_new(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let mut conn = self.conn.clone();
        // SET NX GET: stores only when absent and answers what was there.
        let before: Option<Vec<u8>> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(before)
    }

    async fn put_all_new(
        &self,
        records: Vec<(String, Vec<u8>)>,
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, BusError> {
        if records.is_empty() {
            return Ok(None);
        }
        let mut inv = self.scripts.put_all_new.prepare_invoke();
        inv.arg(ttl.as_millis().max(1) as u64);
        for (k, v) in records {
            inv.key(k).arg(v);
        }
        let mut conn = self.conn.clone();
        let prev: Vec<Vec<u8>> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(prev.into_iter().next())
    }

    async fn put_if(
        &self,
        key: &str,
        expect: &[u8],
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<bool, BusError> {
        self.compare_and_set(key, expect, Some((value, ttl))).await
    }

    async fn delete_if(&self, key: &str, expect: &[u8]) -> Result<bool, BusError> {
        self.compare_and_set(key, expect, None).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn delete(&self, key: &str) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn keep(&self, key: &str, ttl: Duration) -> Result<bool, BusError> {
        let mut conn = self.conn.clone();
        let kept: i64 = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(kept == 1)
    }
}
