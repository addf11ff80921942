-- odmoe for Neovim: odmoed's replies streamed into buffers, over the daemon's own socket.
--
-- Neovim speaks msgpack-RPC natively (sockconnect with rpc = true) but runs only its own API
-- methods when a peer notifies it, and waits for every rpcrequest. So requests go out as
-- notifications that name a relay: odmoed sends each event back as a call of nvim_exec_lua
-- running M._event, and the editor never blocks on a generation.

local M = {}

-- Set with require('odmoe').setup({...}) or the globals g:odmoe_socket and g:odmoe_options.
M.config = {
  -- odmoed's socket; default: $ODMOE_SOCKET, else the daemon's own default path.
  socket = nil,
  -- Fields added to every request: temperature, max_tokens, top_p, ...
  options = {},
}

local RELAY = "return require('odmoe')._event(...)"

local channel = nil
-- What odmoed said to `hello` when the channel was made.
local greeting = nil
-- Generations in flight, by relay id: their handlers.
local pending = {}
-- Relay ids share the connection's msgids with rpcrequest's, which count up from 1.
local next_id = 1000000000

function M.setup(config)
  M.config = vim.tbl_deep_extend('force', M.config, config or {})
end

-- The socket odmoed listens on by default, as the daemon computes it.
local function default_socket()
  if vim.env.ODMOE_SOCKET and vim.env.ODMOE_SOCKET ~= '' then
    return vim.env.ODMOE_SOCKET
  end
  local dir
  if vim.loop.os_uname().sysname == 'Darwin' then
    dir = vim.env.TMPDIR and (vim.env.TMPDIR:gsub('/$', '') .. '/odmoe')
  else
    dir = vim.env.XDG_RUNTIME_DIR and (vim.env.XDG_RUNTIME_DIR .. '/odmoe')
  end
  return (dir or ('/tmp/odmoe-' .. vim.loop.getuid())) .. '/odmoed.sock'
end

function M.socket()
  return M.config.socket or vim.g.odmoe_socket or default_socket()
end

-- The channel to odmoed, connected (and greeted) on first use, and the daemon's greeting.
function M.connect()
  if channel then
    return channel, greeting
  end
  local socket = M.socket()
  local ok, ch = pcall(vim.fn.sockconnect, 'pipe', socket, { rpc = true })
  if not ok or ch == 0 then
    error(('odmoe: cannot connect to odmoed at %s: is it running? (start it with `odmoed`)'):format(socket), 0)
  end
  local greeted, hello = pcall(vim.rpcrequest, ch, 'hello', { client = 'nvim' })
  if not greeted then
    pcall(vim.fn.chanclose, ch)
    error(('odmoe: %s does not answer as odmoed: %s'):format(socket, hello), 0)
  end
  channel, greeting = ch, hello
  return channel, greeting
end

-- Starts METHOD ('generate' or 'chat') with PARAMS; HANDLERS get on_text(text), on_done(result)
-- and on_error(message). Returns the generation's id, for M.cancel.
function M.request(method, params, handlers)
  local request = vim.tbl_extend('force', {}, M.config.options, vim.g.odmoe_options or {}, params)
  next_id = next_id + 1
  local id = next_id
  request.relay = { method = 'nvim_exec_lua', args = { RELAY }, id = id }
  pending[id] = handlers
  local ok, err = pcall(function()
    vim.rpcnotify(M.connect(), method, request)
  end)
  if not ok then
    -- A daemon that restarted closed the old channel: connect again once.
    channel = nil
    ok, err = pcall(function()
      vim.rpcnotify(M.connect(), method, request)
    end)
  end
  if not ok then
    pending[id] = nil
    error(err, 0)
  end
  return id
end

-- Stops generation ID; its reply ends with what was generated so far.
function M.cancel(id)
  if id and pending[id] and channel then
    vim.rpcnotify(channel, 'cancel', { id = id })
  end
end

-- Whether any generation is in flight.
function M.busy()
  return next(pending) ~= nil
end

-- Called by odmoed through the relay, with the event's name and fields.
function M._event(name, event)
  local handlers = pending[event.id]
  if not handlers then
    return
  end
  if name == 'token' then
    handlers.on_text(event.text)
  elseif name == 'done' then
    pending[event.id] = nil
    handlers.on_done(event)
  elseif name == 'error' then
    pending[event.id] = nil
    handlers.on_error(event.message)
  end
end

-- Appends TEXT (which may hold newlines) at the end of BUF.
local function append(buf, text)
  if text == '' or not vim.api.nvim_buf_is_valid(buf) then
    return
  end
  local last = vim.api.nvim_buf_line_count(buf)
  local line = vim.api.nvim_buf_get_lines(buf, last - 1, last, false)[1] or ''
  vim.api.nvim_buf_set_lines(buf, last - 1, last, false, vim.split(line .. text, '\n', { plain = true }))
end

-- A new scratch buffer in a split below, for a reply.
local function scratch(name)
  vim.cmd('botright new')
  local buf = vim.api.nvim_get_current_buf()
  vim.bo[buf].buftype = 'nofile'
  vim.bo[buf].bufhidden = 'hide'
  vim.bo[buf].swapfile = false
  vim.bo[buf].filetype = 'markdown'
  pcall(vim.api.nvim_buf_set_name, buf, ('odmoe://%s/%d'):format(name, buf))
  return buf
end

-- Streams the reply of METHOD/PARAMS at the end of BUF; <C-c> in BUF cancels it.
-- ON_DONE(result) runs once it ends.
local function stream_into(buf, method, params, on_done)
  local id
  local ok, err = pcall(function()
    id = M.request(method, params, {
      on_text = function(text)
        append(buf, text)
        vim.cmd('redraw')
      end,
      on_done = function(result)
        vim.b[buf].odmoe_finish = result.finish_reason
        if on_done then
          on_done(result)
        end
      end,
      on_error = function(message)
        append(buf, ('\n[odmoe: %s]'):format(message))
        vim.notify('odmoe: ' .. message, vim.log.levels.ERROR)
      end,
    })
  end)
  if not ok then
    vim.notify(tostring(err), vim.log.levels.ERROR)
    return
  end
  vim.keymap.set({ 'n', 'i' }, '<C-c>', function()
    M.cancel(id)
  end, { buffer = buf, desc = 'Stop the odmoe reply' })
  return id
end

-- :Odmoe {prompt}: the model's reply to PROMPT in a new scratch buffer.
function M.ask(prompt)
  if prompt == '' then
    vim.notify('odmoe: give a prompt, as in :Odmoe Explain this error', vim.log.levels.WARN)
    return
  end
  local buf = scratch('reply')
  return stream_into(buf, 'chat', { messages = { { role = 'user', content = prompt } } })
end

-- :'<,'>OdmoeSelection {instruction}: the selected lines sent with INSTRUCTION.
function M.selection(first, last, instruction)
  local lines = vim.api.nvim_buf_get_lines(0, first - 1, last, false)
  local filetype = vim.bo.filetype
  local prompt = ('%s\n\n```%s\n%s\n```'):format(
    instruction ~= '' and instruction or 'Explain this code.',
    filetype,
    table.concat(lines, '\n')
  )
  local buf = scratch('selection')
  return stream_into(buf, 'chat', { messages = { { role = 'user', content = prompt } } })
end

local YOU, MODEL = '## You', '## odmoe'

-- The chat buffer: one per Neovim, kept as a session in odmoed so a turn sends only itself.
local function chat_buffer()
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.b[buf].odmoe_session then
      return buf
    end
  end
  local buf = scratch('chat')
  vim.b[buf].odmoe_session = ('nvim-%d-%d'):format(vim.fn.getpid(), buf)
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, { YOU, '' })
  return buf
end

-- :OdmoeChat [message]: sends MESSAGE, or what was typed under the last "## You", as the next
-- turn of the chat buffer's conversation, and streams the reply under "## odmoe".
function M.chat(message)
  local buf = chat_buffer()
  if vim.api.nvim_get_current_buf() ~= buf then
    local win = vim.fn.bufwinid(buf)
    if win ~= -1 then
      vim.api.nvim_set_current_win(win)
    else
      vim.cmd('botright split | buffer ' .. buf)
    end
  end
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  local start = 0
  for i = #lines, 1, -1 do
    if lines[i] == YOU then
      start = i
      break
    end
  end
  if message and message ~= '' then
    append(buf, (vim.trim(table.concat(lines, '', start + 1)) == '' and '' or '\n') .. message)
    lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  end
  local turn = vim.trim(table.concat(vim.list_slice(lines, start + 1), '\n'))
  if turn == '' then
    vim.notify('odmoe: type your message under "' .. YOU .. '", then :OdmoeChat', vim.log.levels.WARN)
    return
  end
  append(buf, '\n\n' .. MODEL .. '\n')
  return stream_into(buf, 'chat', {
    messages = { { role = 'user', content = turn } },
    session = vim.b[buf].odmoe_session,
  }, function()
    append(buf, '\n\n' .. YOU .. '\n')
  end)
end

return M
