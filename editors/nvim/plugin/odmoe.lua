-- Commands of the odmoe plugin; the work is in lua/odmoe/init.lua.
if vim.g.loaded_odmoe then
  return
end
vim.g.loaded_odmoe = true

vim.api.nvim_create_user_command('Odmoe', function(command)
  require('odmoe').ask(command.args)
end, { nargs = '+', desc = "odmoe: stream the model's reply to a prompt into a new buffer" })

vim.api.nvim_create_user_command('OdmoeChat', function(command)
  require('odmoe').chat(command.args)
end, { nargs = '*', desc = 'odmoe: send the next turn of the chat buffer' })

vim.api.nvim_create_user_command('OdmoeSelection', function(command)
  require('odmoe').selection(command.line1, command.line2, command.args)
end, { nargs = '*', range = true, desc = 'odmoe: send the selected lines with an instruction' })
