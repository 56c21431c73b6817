-- The contract's rate-limit step (keel_primitives::backend::rate), in one round trip.
-- KEYS: one state key per rule. ARGV[1]: 'c' (consume) or 'p' (peek); ARGV[2]: the instant
-- in Unix ms, or '' for the server's clock; then five per rule: algorithm (f, s, t, g),
-- limit, period_ms, burst, cost. Returns now, admitted (1/0), then per rule: allowed (1/0),
-- remaining, reset_after_ms, retry_after_ms (-1: none). The arithmetic is the Rust model's,
-- exact in doubles for the quotas the adapter sends here (every scaled value below 2^50).
local floor = math.floor
local TTL_MAX_MS = 315360000000

local function fdiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end
local function cdiv(a, b)
  if b < 1 then b = 1 end
  return fdiv(a + b - 1, b)
end
local function u(n)
  if n < 0 then return 0 end
  return n
end
local function fmt(n)
  return string.format('%.0f', n)
end

local function parse(r, raw)
  if not raw then return nil end
  if r.algo == 'f' then
    local p, i, c = string.match(raw, '^F2:(%d+):(%d+):(%d+)$')
    if p and tonumber(p) == r.period then
      return { idx = tonumber(i), count = tonumber(c) }
    end
  elseif r.algo == 's' then
    local p, i, c, v = string.match(raw, '^S2:(%d+):(%d+):(%d+):(%d+)$')
    if p and tonumber(p) == r.period then
      return { idx = tonumber(i), curr = tonumber(c), prev = tonumber(v) }
    end
  elseif r.algo == 't' then
    local l, t, p = string.match(raw, '^T2:(%d+):(%d+):(%d+)$')
    if l then
      p = tonumber(p)
      if p == 0 then return nil end
      local level = tonumber(l)
      if p ~= r.period then
        level = math.min(fdiv(level, p), r.burst) * r.period
      end
      return { level = level, last = tonumber(t) }
    end
  else
    local t, f, l = string.match(raw, '^G2:(%d+):(%d+):(%d+)$')
    if t then
      local frac = tonumber(f)
      if tonumber(l) ~= r.limit or frac >= r.limit then frac = 0 end
      return { tat = tonumber(t), frac = frac }
    end
  end
  return nil
end

-- { allowed (bool), remaining, reset_after_ms, retry_after_ms (-1), new state, ttl_ms }
local function judge(r, st, now, cost)
  local limit, w = r.limit, r.period
  if r.algo == 'f' or r.algo == 's' then
    if st and st.idx * w > now then now = st.idx * w end
    local index = fdiv(now, w)
    local e = now - index * w
    local ttl = 2 * w - e
    if r.algo == 'f' then
      local count = 0
      if st and st.idx == index then count = st.count end
      local reset = w - e
      local state = 'F2:' .. fmt(w) .. ':' .. fmt(index) .. ':' .. fmt(count + cost)
      if count + cost <= limit then
        return { true, limit - count - cost, reset, -1, state, ttl }
      end
      return { false, u(limit - count), reset, reset, state, ttl }
    end
    local curr, prev = 0, 0
    if st and st.idx == index then
      curr, prev = st.curr, st.prev
    elseif st and st.idx + 1 == index then
      prev = st.curr
    end
    local budget = limit * w - prev * (w - e)
    local available = fdiv(budget, w) - curr
    local allowed = cost <= available
    local after = curr
    if allowed then after = curr + cost end
    local reset = 0
    if after > 0 then
      reset = 2 * w - e
    elseif prev > 0 then
      reset = w - e
    end
    local retry = -1
    if not allowed then
      local slack = limit - curr - cost
      local wait = nil
      if slack >= 0 and prev > 0 then
        local e1 = w - fdiv(slack * w, prev)
        if e1 < w then wait = e1 - e end
      end
      if wait == nil then
        local e2 = 0
        if curr ~= 0 then e2 = math.max(w - fdiv((limit - cost) * w, curr), 0) end
        wait = (w - e) + e2
      end
      retry = u(wait)
    end
    local remaining = available
    if allowed then remaining = available - cost end
    local state = 'S2:' .. fmt(w) .. ':' .. fmt(index) .. ':' .. fmt(curr + cost) .. ':' .. fmt(prev)
    return { allowed, u(remaining), reset, retry, state, ttl }
  elseif r.algo == 't' then
    local cap = r.burst * w
    local level, last = cap, now
    if st then level, last = st.level, st.last end
    local elapsed = u(now - last)
    local most = cdiv(cap, limit)
    if elapsed > most then elapsed = most end
    level = math.min(math.min(level, cap) + elapsed * limit, cap)
    local need = cost * w
    local allowed = need <= level
    local after = level
    if allowed then after = level - need end
    local retry = -1
    if not allowed then retry = cdiv(need - level, limit) end
    local reset = cdiv(cap - after, limit)
    local state = 'T2:' .. fmt(after) .. ':' .. fmt(math.max(last, now)) .. ':' .. fmt(w)
    return { allowed, fdiv(after, w), reset, retry, state, reset }
  end
  -- GCRA, relative to now in units of 1/limit ms.
  local cap = r.burst * w
  local base = 0
  if st then
    local rel = (st.tat - now) * limit + st.frac
    if rel > 0 then base = rel end
  end
  local nxt = base + cost * w
  local allowed = nxt <= cap
  local after = base
  if allowed then after = nxt end
  local retry = -1
  if not allowed then retry = cdiv(nxt - cap, limit) end
  local reset = cdiv(after, limit)
  local whole = fdiv(after, limit)
  local state = 'G2:' .. fmt(now + whole) .. ':' .. fmt(after - whole * limit) .. ':' .. fmt(limit)
  return { allowed, fdiv(u(cap - after), w), reset, retry, state, reset }
end

local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local rules, states, asked = {}, {}, {}
local admitted = true
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 5
  local r = {
    algo = ARGV[b + 1],
    limit = tonumber(ARGV[b + 2]),
    period = tonumber(ARGV[b + 3]),
    burst = tonumber(ARGV[b + 4]),
    cost = tonumber(ARGV[b + 5]),
  }
  rules[i] = r
  local raw = redis.call('GET', KEYS[i])
  if raw == false then raw = nil end
  states[i] = parse(r, raw)
  asked[i] = judge(r, states[i], now, r.cost)
  if not asked[i][1] then admitted = false end
end
local out = { now, admitted and 1 or 0 }
if ARGV[1] == 'c' and admitted then
  for i = 1, #KEYS do
    local a = asked[i]
    if rules[i].cost > 0 then
      local ttl = math.max(1, math.min(a[6], TTL_MAX_MS))
      redis.call('SET', KEYS[i], a[5], 'PX', fmt(ttl))
    end
    out[#out + 1] = 1
    out[#out + 1] = a[2]
    out[#out + 1] = a[3]
    out[#out + 1] = a[4]
  end
else
  for i = 1, #KEYS do
    local a = asked[i]
    local cur = judge(rules[i], states[i], now, 0)
    out[#out + 1] = a[1] and 1 or 0
    out[#out + 1] = cur[2]
    out[#out + 1] = cur[3]
    out[#out + 1] = a[4]
  end
end
return out
