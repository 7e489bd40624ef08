// A real oidc-provider authorization server for the broker's tests. 127.0.0.1 only.
// Usage: node server.js [PORT]   (PORT also from OIDC_PORT; knobs from OIDC_CONFIG, see README.md)
// Prints one JSON line {"event":"ready",...} when it listens, then one JSON line per token
// request ({"event":"token","grant_type",...}), per registration and per device authorization request.
import http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const knobs = {
  accessTokenTTL: 60, // seconds
  scopes: ['cards', 'read'], // resource scopes the MCP upstream offers
  deviceFlow: true, // RFC 8628 on/off
  deviceInterval: 1, // `interval` put in the device authorization response (RFC 8628 default 5)
  deviceCodeTTL: 600, // seconds a device code lives
  slowDownOnce: false, // true or N: the Nth device_code poll that would be authorization_pending answers slow_down (once)
  rotateRefreshToken: true,
  refreshTokenTTL: 86400,
  resource: null, // the MCP upstream URL (RFC 8707 resource); default: ISSUER + /mcp
  account: 'alice@example.test', // the account the interaction logs in
  denyConsent: false, // the interaction answers access_denied instead of granting
  ...JSON.parse(process.env.OIDC_CONFIG || '{}'),
};
const port = Number(process.argv[2] || process.env.OIDC_PORT || 0);
const log = (event, fields) => process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);

const server = http.createServer();
await new Promise((resolve) => { server.listen(port, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;
const resource = knobs.resource || `${issuer}/mcp`;

const provider = new Provider(issuer, {
  clients: [],
  cookies: { keys: ['agentcard-broker-test-only-cookie-key'] },
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  scopes: ['openid', 'offline_access', ...knobs.scopes],
  pkce: { required: () => true },
  clientDefaults: {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'none',
  },
  features: {
    devInteractions: { enabled: false },
    registration: { enabled: true },
    revocation: { enabled: true },
    deviceFlow: { enabled: Boolean(knobs.deviceFlow) },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, indicator) => {
        if (indicator !== resource) throw new errors.InvalidTarget();
        return {
          scope: knobs.scopes.join(' '),
          audience: resource,
          accessTokenTTL: knobs.accessTokenTTL,
          accessTokenFormat: 'opaque',
        };
      },
    },
  },
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: () => Boolean(knobs.rotateRefreshToken),
  ttl: {
    AccessToken: knobs.accessTokenTTL,
    RefreshToken: knobs.refreshTokenTTL,
    DeviceCode: knobs.deviceCodeTTL,
    Grant: 86400,
    Interaction: 600,
    Session: 86400,
    AuthorizationCode: 60,
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
});

let pendingUntilSlowDown = knobs.slowDownOnce === true ? 1 : Number(knobs.slowDownOnce || 0);

// Logging and the test knobs, after the provider answered.
provider.use(async (ctx, next) => {
  await next();
  const route = ctx.oidc?.route;
  const t = Date.now() / 1000;
  const params = ctx.oidc?.params || {};
  if (route === 'token') {
    if (params.grant_type === 'urn:ietf:params:oauth:grant-type:device_code'
        && ctx.body?.error === 'authorization_pending' && pendingUntilSlowDown > 0
        && --pendingUntilSlowDown === 0) {
      ctx.body = { error: 'slow_down', error_description: 'test harness: slow down once' };
    }
    log('token', {
      grant_type: params.grant_type,
      resource: params.resource ?? null,
      scope: params.scope ?? null,
      client_id: ctx.oidc?.client?.clientId ?? null,
      status: ctx.status,
      error: ctx.body?.error ?? null,
      t,
    });
  } else if (route === 'registration') {
    log('registration', {
      application_type: ctx.oidc?.body?.application_type ?? null,
      client_id: ctx.body?.client_id ?? null,
      status: ctx.status,
      t,
    });
  } else if (route === 'device_authorization') {
    if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
      ctx.body = { ...ctx.body, interval: knobs.deviceInterval };
    }
    log('device_authorization', {
      resource: params.resource ?? null, scope: params.scope ?? null, status: ctx.status, t,
    });
  }
});

// The interaction: no form; log the fixed account in, grant what was asked (or deny).
provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/interaction/')) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { prompt, params } = details;
  let result;
  if (knobs.denyConsent) {
    result = { error: 'access_denied', error_description: 'the test user said no' };
  } else if (prompt.name === 'login') {
    result = { login: { accountId: knobs.account } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(d.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
  ctx.status = 303;
  ctx.redirect(returnTo);
});

const callback = provider.callback();
server.on('request', (req, res) => {
  // RFC 9728 protected-resource metadata for the MCP upstream URL, and RFC 8414 metadata
  // at the OAuth location (oidc-provider serves only the OpenID one)
  const path = req.url.split('?')[0];
  if (path === '/.well-known/oauth-protected-resource/mcp' || path === '/.well-known/oauth-protected-resource') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ resource, authorization_servers: [issuer] }));
    return;
  }
  if (path === '/.well-known/oauth-authorization-server') req.url = '/.well-known/openid-configuration';
  callback(req, res);
});

log('ready', { issuer, resource, port: server.address().port });
process.on('SIGTERM', () => { server.close(); process.exit(0); });
