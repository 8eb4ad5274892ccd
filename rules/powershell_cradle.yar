/*
 * PowerShell download cradles: one command line that starts PowerShell
 * hidden (or with policy and profile switched off), fetches code from the
 * web and runs it.  It is how batch files, HTA/VBS/JS droppers, shortcuts and
 * "paste this in Win+R" (ClickFix) pages hand over to the next stage.
 *
 * False positives: documentation, blogs and forums quote such commands in
 * HTML pages.  The first rule therefore skips HTML and asks for the launcher
 * switches *and* the download on the same line; the second one takes HTML
 * only when the command is put into the clipboard by script, which is what a
 * ClickFix page does and what a documentation page's "copy" button does not
 * do with a hidden-window downloader.
 */

rule PowerShell_Hidden_Download_Cradle
{
    meta:
        description = "Script or command file launches a hidden PowerShell that downloads and runs code"
        reference = "https://attack.mitre.org/techniques/T1059/001/"
        severity = "high"

    strings:
        $cradle = /powershell(\.exe)?["']?\s[^\r\n]{0,400}(-w(in(dow(style)?)?)?\s+h(id(den)?)?\b|-nop(rofile)?\b|-ep\s+bypass|-exec(utionpolicy)?\s+bypass)[^\r\n]{0,400}(downloadstring|downloaddata|downloadfile|net\.webclient|invoke-webrequest|invoke-restmethod|start-bitstransfer|\biwr\s|\birm\s)/ nocase

    condition:
        direction == "response"
        and filesize < 8MB
        and not filetype matches /html/i
        and $cradle
}

rule ClickFix_Clipboard_PowerShell
{
    meta:
        description = "Page puts a PowerShell/mshta download command into the clipboard (ClickFix lure)"
        reference = "https://attack.mitre.org/techniques/T1204/004/"
        severity = "high"

    strings:
        $clip1 = "clipboard.writeText" ascii
        $clip2 = /execCommand\s*\(\s*["']copy["']/
        // The command starts a string literal; quotes may follow inside it (escaped).
        $cmd1 = /["'`]\s*powershell(\.exe)?\s[^\r\n]{0,400}(https?:\/\/|iwr\s|irm\s|invoke-webrequest|invoke-restmethod|downloadstring|net\.webclient)/ nocase
        $cmd2 = /["'`]\s*mshta(\.exe)?\s+["']?https?:\/\// nocase
        $cmd3 = /["'`]\s*cmd(\.exe)?\s+\/c\s+[^\r\n]{0,200}(curl|bitsadmin|certutil)[^\r\n]{0,200}https?:\/\// nocase

    condition:
        direction == "response"
        and filesize < 8MB
        and any of ($clip*)
        and any of ($cmd*)
}
