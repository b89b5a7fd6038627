// k6: constant arrival rate above the tenant's limit, with thresholds on p99 and on the 429 ratio.
//   k6 run --no-usage-report -e TARGET=http://127.0.0.1:18281/v1/face/compare -e KEY=tenant-a \
//          -e RATE=75 -e LIMIT=50 loadtest/k6-constant-arrival.js
// At RATE requests/s against a LIMIT QPS plan, about 1 - LIMIT/RATE of the calls must be 429.
import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';

const RATE = Number(__ENV.RATE || 75);
const LIMIT = Number(__ENV.LIMIT || 50);
const expected = Math.max(0, 1 - LIMIT / RATE);
const throttled = new Rate('throttled');

export const options = {
  scenarios: {
    flood: {
      executor: 'constant-arrival-rate',
      rate: RATE, timeUnit: '1s', duration: __ENV.DURATION || '20s',
      preAllocatedVUs: 50, maxVUs: 200,
    },
  },
  thresholds: {
    'http_req_duration{expected_response:true}': ['p(99)<50'],
    // The first second's burst lets a little more through than the steady state.
    throttled: [`rate>${(expected - 0.08).toFixed(3)}`, `rate<${(expected + 0.03).toFixed(3)}`],
    checks: ['rate==1'],
  },
};

export default function () {
  const r = http.post(__ENV.TARGET, '{}', { headers: { 'x-api-key': __ENV.KEY || 'tenant-a' } });
  throttled.add(r.status === 429);
  check(r, {
    'admitted or throttled': (x) => x.status === 200 || x.status === 429,
    'rate-limit fields': (x) => x.headers['Ratelimit-Policy'] === `"qps";q=${LIMIT};w=1`,
  });
}
