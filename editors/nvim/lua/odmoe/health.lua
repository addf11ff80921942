-- :checkhealth odmoe: can this Neovim reach odmoed, and what does it serve?
local M = {}

function M.check()
  local health = vim.health or require('health')
  local start = health.start or health.report_start
  local ok = health.ok or health.report_ok
  local warn = health.warn or health.report_warn
  local fail = health.error or health.report_error

  start('odmoe')
  if vim.fn.has('nvim-0.7') == 1 then
    ok('Neovim 0.7 or later')
  else
    fail('Neovim 0.7 or later is needed (nvim_create_user_command, vim.keymap)')
  end
  local odmoe = require('odmoe')
  local socket = odmoe.socket()
  if vim.loop.fs_stat(socket) == nil then
    fail(('no socket at %s'):format(socket), {
      'start the daemon: odmoed (or `odmoe service install`)',
      'or point the plugin at its socket: let g:odmoe_socket = "/path/to/odmoed.sock"',
    })
    return
  end
  local connected, channel, hello = pcall(odmoe.connect)
  if not connected then
    fail(tostring(channel))
    return
  end
  ok(('odmoed %s answers at %s'):format(hello and hello.server_version or '', socket))
  local stats_ok, stats = pcall(vim.rpcrequest, channel, 'stats', vim.empty_dict())
  if stats_ok and type(stats.model) == 'table' then
    ok(('model: %s (%s, %s)'):format(stats.model.path, stats.model.architecture, stats.model.mode))
  elseif stats_ok then
    warn('odmoed has no model loaded', { 'odmoe load NAME, or odmoed --model PATH' })
  else
    fail('stats failed: ' .. tostring(stats))
  end
end

return M
