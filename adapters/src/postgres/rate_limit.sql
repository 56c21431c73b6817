CREATE OR REPLACE FUNCTION {fdiv}(a numeric, b numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE AS 'SELECT div(a, b) - CASE WHEN a < 0 AND mod(a, b) <> 0 THEN 1 ELSE 0 END';

CREATE OR REPLACE FUNCTION {judge}(
  algo text, lim numeric, w numeric, burst numeric, cost numeric, raw text, now_ms numeric,
  OUT allowed boolean, OUT remaining numeric, OUT reset numeric, OUT retry numeric,
  OUT state text, OUT ttl numeric)
LANGUAGE plpgsql IMMUTABLE AS $judge$
DECLARE
  m text[];
  has boolean := false;
  idx numeric; ix numeric; e numeric; cnt numeric; cur numeric := 0; prv numeric := 0;
  budget numeric; avail numeric; aft numeric; slack numeric; e1 numeric; e2 numeric;
  wt numeric; cap numeric; lvl numeric; lst numeric; need numeric; base numeric := 0;
  nxt numeric; frac numeric;
BEGIN
  retry := -1;
  IF algo = 'f' OR algo = 's' THEN
    IF algo = 'f' THEN
      m := regexp_match(raw, '^F2:(\d+):(\d+):(\d+)$');
    ELSE
      m := regexp_match(raw, '^S2:(\d+):(\d+):(\d+):(\d+)$');
    END IF;
    IF m IS NOT NULL AND m[1]::numeric = w THEN
      has := true;
      idx := m[2]::numeric;
      IF idx * w > now_ms THEN
        now_ms := idx * w;
      END IF;
    END IF;
    ix := div(now_ms, w);
    e := now_ms - ix * w;
    ttl := 2 * w - e;
    IF algo = 'f' THEN
      cnt := CASE WHEN has AND idx = ix THEN m[3]::numeric ELSE 0 END;
      reset := w - e;
      state := 'F2:' || w || ':' || ix || ':' || (cnt + cost);
      IF cnt + cost <= lim THEN
        allowed := true;
        remaining := lim - cnt - cost;
      ELSE
        allowed := false;
        remaining := greatest(lim - cnt, 0);
        retry := reset;
      END IF;
      RETURN;
    END IF;
    IF has AND idx = ix THEN
      cur := m[3]::numeric;
      prv := m[4]::numeric;
    ELSIF has AND idx + 1 = ix THEN
      prv := m[3]::numeric;
    END IF;
    budget := lim * w - prv * (w - e);
    avail := {fdiv}(budget, w) - cur;
    allowed := cost <= avail;
    aft := CASE WHEN allowed THEN cur + cost ELSE cur END;
    reset := CASE WHEN aft > 0 THEN 2 * w - e WHEN prv > 0 THEN w - e ELSE 0 END;
    IF NOT allowed THEN
      slack := lim - cur - cost;
      wt := NULL;
      IF slack >= 0 AND prv > 0 THEN
        e1 := w - {fdiv}(slack * w, prv);
        IF e1 < w THEN
          wt := e1 - e;
        END IF;
      END IF;
      IF wt IS NULL THEN
        e2 := CASE WHEN cur = 0 THEN 0 ELSE greatest(w - {fdiv}((lim - cost) * w, cur), 0) END;
        wt := (w - e) + e2;
      END IF;
      retry := greatest(wt, 0);
    END IF;
    remaining := greatest(CASE WHEN allowed THEN avail - cost ELSE avail END, 0);
    state := 'S2:' || w || ':' || ix || ':' || (cur + cost) || ':' || prv;
    RETURN;
  END IF;
  cap := burst * w;
  IF algo = 't' THEN
    m := regexp_match(raw, '^T2:(\d+):(\d+):(\d+)$');
    IF m IS NOT NULL AND m[3]::numeric <> 0 THEN
      lvl := m[1]::numeric;
      lst := m[2]::numeric;
      IF m[3]::numeric <> w THEN
        lvl := least(div(lvl, m[3]::numeric), burst) * w;
      END IF;
    ELSE
      lvl := cap;
      lst := now_ms;
    END IF;
    lvl := least(least(lvl, cap) + greatest(now_ms - lst, 0) * lim, cap);
    need := cost * w;
    allowed := need <= lvl;
    aft := CASE WHEN allowed THEN lvl - need ELSE lvl END;
    IF NOT allowed THEN
      retry := div(need - lvl + lim - 1, lim);
    END IF;
    remaining := div(aft, w);
    reset := div(cap - aft + lim - 1, lim);
    ttl := reset;
    state := 'T2:' || aft || ':' || greatest(lst, now_ms) || ':' || w;
    RETURN;
  END IF;
  m := regexp_match(raw, '^G2:(\d+):(\d+):(\d+)$');
  IF m IS NOT NULL THEN
    frac := CASE WHEN m[3]::numeric = lim AND m[2]::numeric < lim THEN m[2]::numeric ELSE 0 END;
    base := greatest((m[1]::numeric - now_ms) * lim + frac, 0);
  END IF;
  nxt := base + cost * w;
  allowed := nxt <= cap;
  aft := CASE WHEN allowed THEN nxt ELSE base END;
  IF NOT allowed THEN
    retry := div(nxt - cap + lim - 1, lim);
  END IF;
  remaining := div(greatest(cap - aft, 0), w);
  reset := div(aft + lim - 1, lim);
  ttl := reset;
  state := 'G2:' || (now_ms + div(aft, lim)) || ':' || mod(aft, lim) || ':' || lim;
END
$judge$;

CREATE OR REPLACE FUNCTION {step}(
  keys bytea[], algos text[], lims bigint[], ws bigint[], bursts bigint[], costs bigint[],
  consume boolean, at_ms bigint) RETURNS bigint[]
LANGUAGE plpgsql AS $step$
DECLARE
  n int := cardinality(keys);
  ts timestamptz;
  now_ms numeric;
  raw text;
  raws text[] := '{}';
  asked record;
  cur record;
  ok boolean[] := '{}';
  rem numeric[] := '{}';
  rst numeric[] := '{}';
  rty numeric[] := '{}';
  states text[] := '{}';
  ttls numeric[] := '{}';
  admitted boolean := true;
  result bigint[];
BEGIN
  -- Steps on the same keys run one at a time (locks taken in one global order).
  PERFORM pg_advisory_xact_lock(h)
    FROM (SELECT DISTINCT hashtextextended(encode(k, 'hex'), 7262) AS h FROM unnest(keys) AS k) AS l
    ORDER BY h;
  ts := date_trunc('milliseconds', clock_timestamp());
  now_ms := coalesce(at_ms::numeric, floor(extract(epoch FROM ts) * 1000));
  FOR i IN 1..n LOOP
    raw := NULL;
    SELECT encode(t.value, 'escape') INTO raw FROM {table} AS t
      WHERE t.key = keys[i] AND (t.expires_at IS NULL OR t.expires_at > ts);
    raws[i] := raw;
    asked := {judge}(algos[i], lims[i], ws[i], bursts[i], costs[i], raw, now_ms);
    ok[i] := asked.allowed;
    rem[i] := asked.remaining;
    rst[i] := asked.reset;
    rty[i] := asked.retry;
    states[i] := asked.state;
    ttls[i] := asked.ttl;
    admitted := admitted AND asked.allowed;
  END LOOP;
  result := ARRAY[now_ms::bigint, CASE WHEN admitted THEN 1 ELSE 0 END];
  IF consume AND admitted THEN
    FOR i IN 1..n LOOP
      IF costs[i] > 0 THEN
        INSERT INTO {table} AS t (key, value, expires_at)
          VALUES (keys[i], convert_to(states[i], 'UTF8'),
                  ts + greatest(1, least(ttls[i], 315360000000)) * interval '1 millisecond')
          ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
      END IF;
      result := result || ARRAY[1, rem[i], rst[i], rty[i]]::bigint[];
    END LOOP;
  ELSE
    FOR i IN 1..n LOOP
      cur := {judge}(algos[i], lims[i], ws[i], bursts[i], costs[i] * 0, raws[i], now_ms);
      result := result || ARRAY[CASE WHEN ok[i] THEN 1 ELSE 0 END, cur.remaining, cur.reset, rty[i]]::bigint[];
    END LOOP;
  END IF;
  RETURN result;
END
$step$;
